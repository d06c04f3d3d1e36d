"""Evaluation harness: finding AUC, Dice on the source grid, calibration error, paraphrase robustness.

``evaluate_model(model, manifest)`` runs the real inference path (``Engine.encode`` +
``Engine.query`` with text prompts) on every case of a manifest and compares

* anatomy prompts ("liver", "left lung", ...) with the manifest's structure label map,
* finding prompts ("liver lesion", "left pleural effusion", ...) with the finding masks,
* finding probabilities with the case-level labels (AUC per finding, expected calibration error),
* the same finding probabilities for the held-out paraphrase set (``data/paraphrases_heldout.json``)

All Dice values are computed on the *source* voxel grid (the masks the user would get), never on
the model grid. ``evaluation_report`` writes the results (metrics.json/md/html, comparison tables).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import CTLanguageError
from .manifest import read_manifest, read_structures, sided_label
from .metrics import dice, expected_calibration_error, nanmean, reliability_table, roc_auc
from .phrases import canonical_phrase as canonical_prompt

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]


# ------------------------------------------------------------------------------------------------
# data helpers
# ------------------------------------------------------------------------------------------------
def load_paraphrases(path: str | Path | None = None) -> list[dict]:
    """Held-out paraphrase items: {"text", "kind", "key", "laterality"}."""
    from .resources import package_data_dir

    path = Path(path) if path else package_data_dir() / "paraphrases_heldout.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    items = data.get("items", data) if isinstance(data, dict) else data
    return [dict(i) for i in items if isinstance(i, dict) and i.get("text") and i.get("key")]


def structure_masks(labels: np.ndarray, names: dict, anatomies: Sequence[str]) -> dict:
    """{anatomy key: bool mask} from a structure label map (lung_left/right = union of their lobes,
    body = every labelled voxel, as the training targets)."""
    by_key: dict[str, list[int]] = {}
    for i, k in names.items():
        by_key.setdefault(k, []).append(int(i))
    out = {}
    for a in anatomies:
        if a == "body":
            m = labels > 0
        else:
            ids = list(by_key.get(a, []))
            if a in ("lung_left", "lung_right"):
                side = a.split("_")[1]
                ids += [i for k, v in by_key.items()
                        if k.startswith("lung_") and "lobe" in k and k.endswith(side) for i in v]
            if not ids:
                continue
            m = np.isin(labels, ids)
        if m.any():
            out[a] = m
    return out


# ------------------------------------------------------------------------------------------------
# evaluation of one model
# ------------------------------------------------------------------------------------------------
# the issue-14 metric definitions: Dice of structures >= 5 ml and of findings >= 1 ml per case
MIN_STRUCTURE_ML = 5.0
MIN_FINDING_ML = 1.0


@dataclass
class _Collect:
    structure_dice: dict = field(default_factory=dict)        # key -> [dice]
    finding_dice: dict = field(default_factory=dict)          # key -> [dice]
    probs: dict = field(default_factory=dict)                 # finding -> [(p, y)]
    para_probs: dict = field(default_factory=dict)            # finding -> [(p, y)]
    para_canon: dict = field(default_factory=dict)            # finding -> [(p, y)] same items
    para_parsed_ok: list = field(default_factory=list)
    para_anat_dice: list = field(default_factory=list)
    para_anat_dice_canon: list = field(default_factory=list)
    text_probs: dict = field(default_factory=dict)            # finding -> [(p, y)] paraphrase as positive
    text_canon: dict = field(default_factory=dict)            # finding -> [(p, y)] ensemble, same items
    encode_s: list = field(default_factory=list)
    query_ms: list = field(default_factory=list)
    skipped_small: dict = field(default_factory=lambda: {"structures": 0, "findings": 0})
    para_unanswered: int = 0                                  # paraphrases with no probability


def evaluate_model(model: Any, manifest: str | Path, *, device: Optional[str] = None,
                   paraphrases: Optional[Sequence[dict]] = None, use_paraphrases: bool = True,
                   max_cases: Optional[int] = None, mask_threshold: float = 0.5,
                   min_structure_ml: float = MIN_STRUCTURE_ML, min_finding_ml: float = MIN_FINDING_ML,
                   progress: Optional[ProgressFn] = None) -> dict:
    """Evaluate ``model`` (an Engine, a model folder, catalog id or "default") on a manifest.

    Runs the real engine path per case: read_ct -> Engine.encode -> Engine.query (canonical
    anatomy and finding prompts, then the held-out paraphrases) and compares masks on the source
    grid with the manifest's structure label map and finding masks. Structures smaller than
    ``min_structure_ml`` and findings smaller than ``min_finding_ml`` in a case (e.g. an organ cut
    to a sliver at the edge of a slab) are left out of the Dice means and counted as skipped."""
    from . import vocabulary as V
    from .engine import Engine
    from .io import read_ct

    engine = model if isinstance(model, Engine) else Engine.load(model, device=device)
    manifest = Path(manifest)
    root = manifest.parent
    cases = read_manifest(manifest)
    if max_cases:
        cases = cases[: int(max_cases)]
    if paraphrases is None:
        paraphrases = load_paraphrases() if use_paraphrases else []
    findings = V.findings()
    c = _Collect()
    t_start = time.perf_counter()

    for n_case, case in enumerate(cases):
        cid = case.get("case_id", f"case {n_case}")
        if progress:
            progress(n_case / len(cases), f"Evaluating {cid}")
        volume = read_ct(root / case["image"])
        t = time.perf_counter()
        enc = engine.encode(volume, use_cache=False)
        c.encode_s.append(time.perf_counter() - t)

        def ask(text, masks=True):
            t0 = time.perf_counter()
            out = engine.query(enc, text, mask_threshold=mask_threshold, compute_masks=masks,
                               absent_masks=True)[0]
            if masks:  # latency of full answers (mask on the source grid included)
                c.query_ms.append(1000 * (time.perf_counter() - t0))
            return out

        # --- structures (Dice on the source grid)
        gt_struct = {}
        labels, names = read_structures(case, root, volume.array.shape)
        if labels is not None:
            gt_struct = structure_masks(labels, names, engine.anatomies)
            del labels
            for key, gt in gt_struct.items():
                if gt.sum() * volume.voxel_volume_ml < min_structure_ml:
                    c.skipped_small["structures"] += 1
                    continue
                f = ask(canonical_prompt(key))
                c.structure_dice.setdefault(key, []).append(dice(f.mask, gt))

        # --- finding masks (Dice on the source grid), grouped per (finding, side)
        groups: dict[tuple, np.ndarray] = {}
        for fd in case.get("findings") or []:
            if not fd.get("mask"):
                continue
            lat = fd.get("laterality") if fd.get("laterality") in ("left", "right") else None
            mv = read_ct(root / fd["mask"], validate=False)
            m = mv.array > 0.5
            k = (fd["name"], lat)
            groups[k] = m if k not in groups else (groups[k] | m)
        for (name, lat), gt in groups.items():
            if name not in findings or not gt.any():
                continue
            if gt.sum() * volume.voxel_volume_ml < min_finding_ml:
                c.skipped_small["findings"] += 1
                continue
            f = ask(canonical_prompt(name, lat))
            c.finding_dice.setdefault(name, []).append(dice(f.mask, gt))
        del groups

        # --- presence: canonical unsided prompt per finding vs the case label
        for name in findings:
            y = sided_label(case, name, None)
            if y is None:
                continue
            f = ask(canonical_prompt(name), masks=False)
            if f.probability is None:   # the scores model gives no number for it (e.g. fVLM)
                continue
            c.probs.setdefault(name, []).append((f.probability, y))

        # --- held-out paraphrases (system level: parser + fallback + model)
        for item in paraphrases:
            key, lat, text = item["key"], item.get("laterality"), item["text"]
            if item.get("kind") == "anatomy":
                gt = gt_struct.get(key)
                if gt is None or key not in c.structure_dice or \
                        gt.sum() * volume.voxel_volume_ml < min_structure_ml:
                    continue
                f = ask(text)
                c.para_anat_dice.append(dice(f.mask, gt))
                c.para_anat_dice_canon.append(c.structure_dice[key][-1])
                c.para_parsed_ok.append(f.kind == "anatomy" and key in f.anatomies)
                continue
            y = sided_label(case, key, lat)
            if y is None:
                continue
            canon = ask(canonical_prompt(key, lat), masks=False)
            if canon.probability is None:   # no number for this finding from this model
                continue
            f = ask(text, masks=False)
            c.para_unanswered += f.probability is None   # "not understood": counted, scored as 0
            p = f.probability if f.probability is not None else 0.0
            c.para_probs.setdefault(key, []).append((p, y))
            c.para_canon.setdefault(key, []).append((canon.probability, y))
            # model level: the paraphrase itself as the positive phrasing of the presence score
            try:
                pair = (engine.presence_probability(enc, key, lat, positives=[text]),
                        engine.presence_probability(enc, key, lat))
            except CTLanguageError:   # no number, or no custom phrasing, from this scores model
                pair = None
            if pair is not None:
                c.text_probs.setdefault(key, []).append((pair[0], y))
                c.text_canon.setdefault(key, []).append((pair[1], y))
            c.para_parsed_ok.append(f.finding == key and (lat is None or f.laterality == lat))
        del enc, volume
    if progress:
        progress(1.0, "Done")
    res = _summarise(engine, manifest, len(cases), c, time.perf_counter() - t_start, mask_threshold)
    res["size_filter"] = {"min_structure_ml": min_structure_ml, "min_finding_ml": min_finding_ml,
                          "skipped": dict(c.skipped_small)}
    return res


def _auc_table(pairs: dict) -> dict:
    out = {}
    for key, rows in pairs.items():
        y = [r[1] for r in rows]
        p = [r[0] for r in rows]
        out[key] = {"auc": roc_auc(y, p), "n_pos": int(sum(y)), "n_neg": int(len(y) - sum(y))}
    return out


def json_safe(x):
    """NaN -> None for JSON."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _summarise(engine, manifest, n_cases, c: _Collect, seconds, mask_threshold) -> dict:
    structures = {k: {"dice": nanmean(v), "n": len(v)} for k, v in sorted(c.structure_dice.items())}
    auc = _auc_table(c.probs)
    findings = {}
    for key in sorted(set(auc) | set(c.finding_dice)):
        row = dict(auc.get(key, {"auc": float("nan"), "n_pos": 0, "n_neg": 0}))
        d = c.finding_dice.get(key, [])
        row.update({"dice": nanmean(d), "n_dice": len(d)})
        findings[key] = row
    all_p = [p for rows in c.probs.values() for p, _ in rows]
    all_y = [y for rows in c.probs.values() for _, y in rows]
    para_auc = _auc_table(c.para_probs)
    para_canon_auc = _auc_table(c.para_canon)
    common = [k for k in para_auc if not math.isnan(para_auc[k]["auc"])
              and not math.isnan(para_canon_auc.get(k, {"auc": float("nan")})["auc"])]
    para_mean = nanmean(para_auc[k]["auc"] for k in common)
    canon_mean = nanmean(para_canon_auc[k]["auc"] for k in common)
    para = {
        "n_items_scored": int(sum(len(v) for v in c.para_probs.values())),
        "n_unanswered": int(c.para_unanswered),
        "per_finding": {k: {"auc": para_auc[k]["auc"], "auc_canonical": para_canon_auc[k]["auc"],
                            "n_pos": para_auc[k]["n_pos"], "n_neg": para_auc[k]["n_neg"]}
                        for k in sorted(para_auc)},
        "mean_auc": para_mean,
        "mean_auc_canonical": canon_mean,
        "auc_drop": (canon_mean - para_mean) if common else float("nan"),
        "parser_accuracy": nanmean([float(x) for x in c.para_parsed_ok]),
        "anatomy_dice": nanmean(c.para_anat_dice),
        "anatomy_dice_canonical": nanmean(c.para_anat_dice_canon),
    }
    t_auc, t_canon = _auc_table(c.text_probs), _auc_table(c.text_canon)
    t_common = [k for k in t_auc if not math.isnan(t_auc[k]["auc"])
                and not math.isnan(t_canon.get(k, {"auc": float("nan")})["auc"])]
    t_mean = nanmean(t_auc[k]["auc"] for k in t_common)
    t_canon_mean = nanmean(t_canon[k]["auc"] for k in t_common)
    para["model_level"] = {
        "description": "presence score with the paraphrase itself as the only positive phrasing "
                       "(no parser), against the standard ensemble on the same items",
        "mean_auc": t_mean, "mean_auc_ensemble": t_canon_mean,
        "auc_drop": (t_canon_mean - t_mean) if t_common else float("nan"),
        "per_finding": {k: t_auc[k]["auc"] for k in sorted(t_auc)},
    }
    para_p = [p for rows in c.para_probs.values() for p, _ in rows]
    para_y = [y for rows in c.para_probs.values() for _, y in rows]
    para["ece"] = expected_calibration_error(para_p, para_y) if para_p else float("nan")
    result = {
        "model": {**engine.describe(),
                  "presence_source": getattr(engine.roles["scores"], "presence_source", None)},
        "data": {"manifest": str(manifest), "n_cases": n_cases},
        "mask_threshold": mask_threshold,
        "mean_structure_dice": nanmean(v["dice"] for v in structures.values()),
        "mean_finding_dice": nanmean(v["dice"] for v in findings.values() if v["n_dice"]),
        "mean_finding_auc": nanmean(v["auc"] for v in findings.values()),
        "ece": expected_calibration_error(all_p, all_y) if all_p else float("nan"),
        "n_presence_pairs": len(all_p),
        "reliability": reliability_table(all_p, all_y) if all_p else [],
        "presence_pairs": {k: {"p": [r[0] for r in rows], "y": [r[1] for r in rows]}
                           for k, rows in sorted(c.probs.items())},
        "structures": structures,
        "findings": findings,
        "paraphrases": para,
        "timing": {"seconds": seconds, "encode_mean_s": nanmean(c.encode_s),
                   "query_mean_ms": nanmean(c.query_ms), "n_queries": len(c.query_ms)},
    }
    return json_safe(result)

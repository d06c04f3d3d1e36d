"""Evaluation harness: finding AUC, Dice on the source grid, calibration error, paraphrase robustness.

``evaluate_model(model, manifest)`` runs the real inference path (``Engine.encode`` +
``Engine.query`` with text prompts) on every case of a manifest and compares

* anatomy prompts ("liver", "left lung", ...) with the manifest's structure label map,
* finding prompts ("liver lesion", "left pleural effusion", ...) with the finding masks,
* finding probabilities with the case-level labels (AUC per finding, expected calibration error),
* the same finding probabilities for the held-out paraphrase set (``data/paraphrases_heldout.json``)

All Dice values are computed on the *source* voxel grid (the masks the user would get), never on
the model grid. ``compare_models`` puts several evaluated models into one Markdown table.
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


def _clean(x):
    """NaN -> None for JSON."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
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
    return _clean(result)


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    return f"{x:.{digits}f}"


def _size_note(m: dict) -> str:
    f = m.get("size_filter")
    if not f:
        return ""
    return (f", for structures of at least {f['min_structure_ml']:g} ml and findings of at least "
            f"{f['min_finding_ml']:g} ml in a case ({f['skipped']['structures']} structures and "
            f"{f['skipped']['findings']} findings below that left out)")


def metrics_markdown(m: dict, title: Optional[str] = None, figures: Optional[dict] = None) -> str:
    """One model's metrics as Markdown tables; ``figures`` {kind: link} adds the pictures."""
    model = m.get("model", {})
    lines = [f"# {title or 'Evaluation: ' + str(model.get('id'))}", ""]
    lines += [
        f"Model `{model.get('id')}` {model.get('version', '')} (weights sha256 "
        f"`{str(model.get('sha256'))[:12]}…`, presence from {model.get('presence_source') or 'its'} "
        f"embeddings, {model.get('calibration') or 'uncalibrated'}); "
        f"data `{m['data']['manifest']}` ({m['data']['n_cases']} cases); mask threshold "
        f"{m.get('mask_threshold')}. Dice is computed on the source voxel grid{_size_note(m)}.", "",
        "| metric | value |", "|---|---|",
        f"| mean structure Dice | {_f(m.get('mean_structure_dice'))} |",
        f"| mean finding Dice | {_f(m.get('mean_finding_dice'))} |",
        f"| mean finding AUC | {_f(m.get('mean_finding_auc'))} |",
        f"| ECE (10 bins, {m.get('n_presence_pairs')} case x finding pairs) | {_f(m.get('ece'))} |",
        f"| paraphrase mean AUC | {_f(m['paraphrases'].get('mean_auc'))} |",
        f"| canonical mean AUC, same items | {_f(m['paraphrases'].get('mean_auc_canonical'))} |",
        f"| paraphrase AUC drop (system: parser + model) | {_f(m['paraphrases'].get('auc_drop'))} |",
        f"| paraphrase AUC drop (model level: paraphrase as the positive phrasing) | "
        f"{_f(m['paraphrases'].get('model_level', {}).get('auc_drop'))} |",
        f"| paraphrase parser accuracy | {_f(m['paraphrases'].get('parser_accuracy'))} |",
        f"| paraphrases without an answer (of {m['paraphrases'].get('n_items_scored')}) | "
        f"{_f(m['paraphrases'].get('n_unanswered'))} |",
        f"| paraphrase anatomy Dice (canonical) | {_f(m['paraphrases'].get('anatomy_dice'))} "
        f"({_f(m['paraphrases'].get('anatomy_dice_canonical'))}) |",
        f"| encode time per case (s) | {_f(m['timing'].get('encode_mean_s'), 2)} |",
        f"| query time per prompt with mask (ms) | {_f(m['timing'].get('query_mean_ms'), 1)} |",
        "",
    ]
    if figures:
        names = {"roc": "ROC curves per finding", "reliability": "Reliability diagram",
                 "dice": "Dice per structure"}
        lines += ["## Figures", ""] + [f"![{names[k]}]({v})" for k, v in figures.items()] + [""]
    lines += [
        "## Findings", "",
        "| finding | AUC | positives | negatives | Dice | cases with mask |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in m.get("findings", {}).items():
        lines.append(f"| {k} | {_f(v.get('auc'))} | {v.get('n_pos')} | {v.get('n_neg')} | "
                     f"{_f(v.get('dice'))} | {v.get('n_dice')} |")
    lines += ["", "## Structures", "", "| structure | Dice | cases |", "|---|---|---|"]
    for k, v in m.get("structures", {}).items():
        lines.append(f"| {k} | {_f(v.get('dice'))} | {v.get('n')} |")
    para = m.get("paraphrases", {})
    if para.get("per_finding"):
        lines += ["", "## Held-out paraphrases", "",
                  "| finding | paraphrase AUC | canonical AUC (same items) | positives | negatives |",
                  "|---|---|---|---|---|"]
        for k, v in para["per_finding"].items():
            lines.append(f"| {k} | {_f(v.get('auc'))} | {_f(v.get('auc_canonical'))} | "
                         f"{v.get('n_pos')} | {v.get('n_neg')} |")
    if m.get("reliability"):
        lines += ["", "## Reliability (calibration)", "",
                  "| bin | n | mean probability | observed frequency |", "|---|---|---|---|"]
        for r in m["reliability"]:
            lines.append(f"| {r['bin']} | {r['n']} | {_f(r['mean_probability'])} | "
                         f"{_f(r['observed_frequency'])} |")
    return "\n".join(lines) + "\n"


COMPARISON_COLUMNS = [
    ("mean structure Dice", lambda m: m.get("mean_structure_dice")),
    ("mean finding Dice", lambda m: m.get("mean_finding_dice")),
    ("mean finding AUC", lambda m: m.get("mean_finding_auc")),
    ("ECE", lambda m: m.get("ece")),
    ("paraphrase AUC", lambda m: m.get("paraphrases", {}).get("mean_auc")),
    ("paraphrase AUC drop", lambda m: m.get("paraphrases", {}).get("auc_drop")),
    ("paraphrase AUC drop (model level)",
     lambda m: m.get("paraphrases", {}).get("model_level", {}).get("auc_drop")),
]


def comparison_rows(results: dict) -> list[dict]:
    rows = []
    for label, m in results.items():
        row = {"model": label, "id": m["model"].get("id"),
               "presence_source": m["model"].get("presence_source"),
               "n_cases": m["data"]["n_cases"]}
        for name, fn in COMPARISON_COLUMNS:
            row[name] = fn(m)
        rows.append(row)
    return rows


def comparison_markdown(results: dict, title: str = "Model comparison") -> str:
    """Several evaluated models (``{label: metrics}``) in one table, plus per-finding AUCs."""
    rows = comparison_rows(results)
    first = next(iter(results.values()))
    lines = [f"# {title}", "",
             f"Data: `{first['data']['manifest']}` ({first['data']['n_cases']} cases). Produced by "
             "`ctlanguage evaluate` (one engine path for every model: masks mapped to the source grid, "
             "presence from the calibrated prompt-ensemble score).", "",
             "| model | presence from | " + " | ".join(n for n, _ in COMPARISON_COLUMNS) + " |",
             "|---|---|" + "---|" * len(COMPARISON_COLUMNS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['presence_source']} | "
                     + " | ".join(_f(r[n]) for n, _ in COMPARISON_COLUMNS) + " |")
    labels = list(results)
    if len(labels) > 1:
        base = labels[0]
        lines += ["", f"AUC gap of each model relative to `{base}` (positive: `{base}` is better): "
                  + ", ".join(
                      f"`{l}` {_f((results[base].get('mean_finding_auc') or float('nan')) - (results[l].get('mean_finding_auc') or float('nan')))}"
                      for l in labels[1:]) + "."]
    keys = sorted({k for m in results.values() for k in m.get("findings", {})})
    lines += ["", "## AUC per finding", "", "| finding | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(labels)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(
            _f(results[l].get("findings", {}).get(k, {}).get("auc")) for l in labels) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str | Path, doc: str | Path | None = None) -> dict:
    """Write metrics.json, metrics.md and metrics.html (tables and pictures: figures/*.png) into
    ``out_dir``; with several models one comparison table comes first, then each model's details.
    With ``doc`` also write the tables (no pictures) there (e.g. docs/model_comparison.md).

    Written atomically (temporary file + rename). Returns {name: path}."""
    import base64

    from markdown_it import MarkdownIt

    from . import evaluation_figures as FIG
    from .exports import slugify
    from .exports.atomic import check_writable_dir
    from .io import atomic_write

    out = Path(out_dir)
    check_writable_dir(out)
    files = {}

    def put(path: Path, text: str):
        files[path.name] = atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    single = len(results) == 1
    figures = {label: FIG.write_figures(m, out / "figures", prefix="" if single else f"{slugify(label)}-")
               for label, m in results.items()}
    for made in figures.values():
        files.update({f"figures/{p.name}": p for p in made.values()})

    def document(links) -> str:
        if single:
            (label, m), = results.items()
            return metrics_markdown(m, figures=links(label))
        md = comparison_markdown(results)
        for label, m in results.items():
            md += "\n---\n\n" + metrics_markdown(m, title=f"Details: {label}", figures=links(label)
                                                  ).replace("\n## ", "\n### ")
        return md

    def relative(label):
        return {k: p.relative_to(out).as_posix() for k, p in figures[label].items()}

    def inline(label):   # metrics.html is one self-contained file
        return {k: "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
                for k, p in figures[label].items()}

    payload = next(iter(results.values())) if single else \
        _clean({"models": results, "comparison": comparison_rows(results)})
    put(out / "metrics.json", json.dumps(payload, indent=2) + "\n")
    put(out / "metrics.md", document(relative))
    body = MarkdownIt("commonmark").enable("table").render(document(inline))
    put(out / "metrics.html", "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>CTLanguage "
        "evaluation</title><style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%}</style></head><body>\n" + body + "</body></html>\n")
    if doc:
        doc = Path(doc)
        doc.parent.mkdir(parents=True, exist_ok=True)
        put(doc, document(lambda label: None))
        files["doc"] = doc
    return files

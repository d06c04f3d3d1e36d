"""Site calibration: per-finding temperature and offset fitted on a user's labelled cohort.

``ctlanguage calibrate --model ID --data MANIFEST`` scores every case of the manifest with the
model (raw presence logit ``z``, before any calibration), fits for each finding

    p = sigmoid(z / temperature + offset)

by minimising the log-loss (scipy L-BFGS-B on slope 1/T and offset), and stores the result as
``calibration.json`` beside the model, or for an embedded or read-only model folder in the user
cache (``engine.scoring.user_calibration_path``), where the engine's scoring finds it. Findings with fewer than ``MIN_PER_CLASS`` positive or negative cases
get the shared fit (one temperature and offset over all findings' pairs pooled): too few
examples would make their own fit follow noise.

File format "ctlanguage-calibration/1" (read by ``engine.scoring.Calibration.from_file``):
{"format", "model_id", "model_sha256", "name", "n", "date", "score", "manifest", "temperature",
 "offsets": {finding: float, "_default": float}, "per_finding": {finding: {"temperature",
 "offset", "fit", "n_pos", "n_neg", "auc"}}, "ece_before", "ece_after"}
``temperature`` and ``offsets["_default"]`` are the shared fit (used for findings the cohort did
not label); ECE is over all (case, finding) pairs of the cohort, before (the probabilities the
model gave, with whatever calibration it had) and after.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .engine.scoring import CALIBRATION_FILE, CALIBRATION_FORMAT, Calibration, user_calibration_path
from .errors import CTLanguageError, InputError
from .metrics import expected_calibration_error, roc_auc

MIN_PER_CLASS = 10
ProgressFn = Callable[[float, str], None]


# ------------------------------------------------------------------------------ scores
def scores_backend(engine):
    """The engine's scores backend, if its scores can be calibrated (it gives raw presence scores)."""
    sb = engine.roles["scores"]
    if not (sb.capabilities.scores and callable(getattr(sb, "presence", None))):
        raise CTLanguageError(f"The model {engine.model_id} has no presence score that can be calibrated.")
    return sb


def active_calibration(engine) -> Optional[Calibration]:
    """The calibration the engine's scores backend applies now (the model's own or a site's;
    None: its scores are raw, e.g. Merlin's zero-shot score before any site calibration)."""
    cal = getattr(scores_backend(engine), "calibration", None)
    return cal if isinstance(cal, Calibration) else None


def raw_presence_scores(engine, encoding, findings) -> dict:
    """{finding: raw presence logit} of one encoded case (max over sides for a sided finding):
    the one place calibration asks the model for a score."""
    scores_backend(engine)   # refuses models whose scores cannot be calibrated
    out = {}
    for f in findings:
        try:
            out[f] = engine.presence_score(encoding, f)
        except InputError:   # no number for it on this case (e.g. fVLM: not its finding, region absent)
            continue
    return out


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def collect_scores(engine, manifest: str | Path, progress: Optional[ProgressFn] = None,
                   scorer=None) -> dict:
    """({finding: (raw scores, labels)}, number of cases scored) over the cases of ``manifest``
    (case-level labels; a case that neither labels nor lists a finding is skipped for it).
    ``scorer`` replaces ``raw_presence_scores`` (tests deliberately mis-scale it)."""
    from . import vocabulary as V
    from .io import read_ct
    from .manifest import read_manifest, sided_label

    scorer = scorer or raw_presence_scores
    manifest = Path(manifest)
    cases = read_manifest(manifest)
    known = set(V.findings())
    pairs: dict = {}
    n_scored = 0
    for n, case in enumerate(cases):
        if "image" not in case:
            raise InputError(f"Case {n + 1} of {manifest} has no \"image\".")
        if progress:
            progress(n / len(cases), f"Scoring {case.get('case_id', n + 1)}")
        # a finding the case neither labels nor lists is unknown there, not absent
        named = set(case.get("labels") or {}) | {e.get("name") for e in case.get("findings") or []}
        labels = {f: sided_label(case, f, None) for f in sorted(known & named)}
        if not labels:
            continue
        n_scored += 1
        enc = engine.encode(read_ct(manifest.parent / case["image"]), use_cache=False)
        for f, z in scorer(engine, enc, sorted(labels)).items():
            pairs.setdefault(f, ([], []))
            pairs[f][0].append(float(z))
            pairs[f][1].append(int(labels[f]))
    if progress:
        progress(1.0, "Scored")
    if not pairs:
        raise InputError(f"No case of {manifest} has presence labels (\"labels\": {{finding: 0/1}}).")
    return {f: (np.asarray(z), np.asarray(y)) for f, (z, y) in sorted(pairs.items())}, n_scored


# ------------------------------------------------------------------------------ fitting
def fit_temperature_offset(z, y) -> tuple[float, float]:
    """(temperature, offset) minimising the mean log-loss of sigmoid(z / T + b). The slope 1/T is
    kept in [1e-3, 1e3] (a score that ranks the wrong way gets a very large T, i.e. no trust)."""
    from scipy.optimize import minimize

    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    scale = float(np.std(z)) or 1.0        # optimise on a unit scale, report on the raw one

    def loss(params):
        a, b = params
        q = a * z / scale + b
        p = sigmoid(q)
        value = float(np.mean(np.logaddexp(0.0, q) - y * q))
        g = p - y
        return value, np.array([float(np.mean(g * z / scale)), float(np.mean(g))])

    prior = min(max(float(y.mean()), 1e-3), 1 - 1e-3)
    res = minimize(loss, np.array([1.0, math.log(prior / (1 - prior))]), jac=True, method="L-BFGS-B",
                   bounds=[(1e-3 * scale, 1e3 * scale), (-50.0, 50.0)])
    a, b = res.x
    return float(scale / a), float(b)


def fit(pairs: dict, min_per_class: int = MIN_PER_CLASS) -> dict:
    """Temperatures and offsets for {finding: (raw scores, labels)}: own fit where a finding has
    ``min_per_class`` positives and negatives, else the shared (pooled) fit."""
    z_all = np.concatenate([z for z, _ in pairs.values()])
    y_all = np.concatenate([y for _, y in pairs.values()])
    t_shared, b_shared = fit_temperature_offset(z_all, y_all)
    per = {}
    for f, (z, y) in pairs.items():
        n_pos = int(y.sum())
        n_neg = int(y.size - n_pos)
        own = n_pos >= min_per_class and n_neg >= min_per_class
        t, b = fit_temperature_offset(z, y) if own else (t_shared, b_shared)
        per[f] = {"temperature": t, "offset": b, "fit": "own" if own else "shared",
                  "n_pos": n_pos, "n_neg": n_neg, "auc": _num(roc_auc(y, z))}
    return {"temperature": t_shared, "offsets": {**{f: v["offset"] for f, v in per.items()},
                                                 "_default": b_shared}, "per_finding": per}


def as_calibration(params: dict, name: str = "", n: Optional[int] = None) -> Calibration:
    """The engine's Calibration for fitted ``params`` (what the scoring will apply)."""
    return Calibration(temperature=params["temperature"], offsets=dict(params["offsets"]),
                       temperatures={f: v["temperature"] for f, v in params["per_finding"].items()},
                       name=name, n=n)


def ece(cal: Calibration, pairs: dict) -> float:
    """ECE over all (case, finding) pairs of ``pairs`` with the probabilities of ``cal``."""
    p = [cal.probability(v, f) for f, (z, _) in pairs.items() for v in z]
    y = np.concatenate([y for _, y in pairs.values()])
    return float(expected_calibration_error(p, y))


def _num(x: float):
    return None if x is None or math.isnan(x) else float(x)


# ------------------------------------------------------------------------------ files
def target_file(model_dir: Optional[str | Path], model_id: str, model_sha256: str) -> Path:
    """``calibration.json`` beside the model when its folder is the user's and writable, else
    ``user_calibration_path``."""
    from .errors import ExportError
    from .exports.atomic import check_writable_dir
    from .resources import resources_dir

    if model_dir is not None:
        d = Path(model_dir).resolve()
        try:
            embedded = d.is_relative_to(resources_dir().resolve())
        except Exception:  # noqa: BLE001 - no resources folder: nothing is embedded
            embedded = False
        if not embedded:
            try:
                check_writable_dir(d, create=False)
                return d / CALIBRATION_FILE
            except ExportError:
                pass
    return user_calibration_path(model_id, model_sha256)


def calibrate(engine, manifest: str | Path, name: Optional[str] = None, *, scorer=None,
              progress: Optional[ProgressFn] = None, min_per_class: int = MIN_PER_CLASS) -> dict:
    """Score the cohort, fit, and return the calibration document (not yet written)."""
    manifest = Path(manifest)
    info = scores_backend(engine).info   # in a pipeline: the model whose numbers are calibrated
    before = active_calibration(engine)
    pairs, n_cases = collect_scores(engine, manifest, progress=progress, scorer=scorer)
    params = fit(pairs, min_per_class)
    return {
        "format": CALIBRATION_FORMAT, "model_id": info.id, "model_sha256": info.sha256 or "",
        "name": name or manifest.resolve().parent.name, "n": int(n_cases),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "score": "raw presence logit z (before the model's own calibration); "
                 "p = sigmoid(z / temperature + offset)",
        "manifest": str(manifest),
        **params,
        "ece_before": ece(before, pairs) if before is not None else None,   # raw scores: no ECE
        "ece_after": ece(as_calibration(params), pairs),
    }


def write(doc: dict, path: str | Path) -> Path:
    """Write a calibration document atomically (ExportError when the folder cannot take it)."""
    from .exports.atomic import check_writable_dir
    from .io import atomic_write

    path = Path(path)
    check_writable_dir(path.parent)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))

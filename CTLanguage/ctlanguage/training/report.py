"""Quick model-space metrics of trained models and the comparison table.

    python -m ctlanguage.training.report --manifest EVAL/manifest.jsonl \
        --models NAME=DIR [NAME=DIR ...] --out docs/model_comparison.md [--json FILE]

Metrics are computed on the model grid (organ/finding Dice against the resampled label maps,
case-level AUC = max over sides, ECE with the model's calibration temperature, AUC with the
held-out paraphrases as positive phrasings). The source-grid numbers of the shipped model come
from `ctlanguage evaluate` (evaluation harness)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..metrics import nanmean, roc_auc
from ..model import GroundedCTModel
from .dataset import ManifestDataset
from .train import case_level, collect_predictions, heldout_ensembles, summarize


def quick_eval(model_dir: str | Path, manifest: str | Path, features=None) -> dict:
    """``features``: cache folder(s) of ``manifest`` (training/features.py) to use instead of
    encoding every case; refused unless the model's frozen encoder computed them."""
    model = GroundedCTModel.from_pretrained(model_dir, device="cpu")
    if features:
        from .features import FeatureSet

        ds = FeatureSet(features, preload=False)   # each case is read once
        ds.check_encoder(model)
    else:
        ds = ManifestDataset(manifest, model.config.spec, model.config.anatomies,
                             feature_stride=model.config.feature_stride)
    pred = collect_predictions(model, ds, heldout=heldout_ensembles())
    res = summarize(pred, model.config.calibration_temperature, model.config.calibration_bias)
    res["calibration_temperature"] = model.config.calibration_temperature
    res["steps"] = (model.config.training or {}).get("steps")
    res["losses"] = (model.config.training or {}).get("losses")
    z, y, names = case_level(pred["logits"], pred["labels"], pred["items"])
    res["_case_level"] = {"z": z, "y": y, "names": names}   # for the bootstrap; not written to JSON
    return res


def mean_auc(z: np.ndarray, y: np.ndarray) -> float:
    """Mean over findings (columns) of the case-level AUC; findings without both classes skipped."""
    return nanmean(roc_auc(y[:, k], z[:, k]) for k in range(y.shape[1]))


def bootstrap_auc_difference(a: dict, b: dict, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Paired case bootstrap of mean finding AUC(a) - AUC(b) on the same cases:
    (observed difference, 2.5th percentile, 97.5th percentile)."""
    za, ya, zb, yb = a["z"], a["y"], b["z"], b["y"]
    if not np.array_equal(ya, yb):
        raise ValueError("the two models were not evaluated on the same cases")
    rng = np.random.default_rng(seed)
    obs = mean_auc(za, ya) - mean_auc(zb, yb)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, ya.shape[0], ya.shape[0])
        d = mean_auc(za[i], ya[i]) - mean_auc(zb[i], yb[i])
        if not np.isnan(d):
            diffs.append(d)
    lo, hi = np.percentile(diffs, [2.5, 97.5]) if diffs else (float("nan"), float("nan"))
    return float(obs), float(lo), float(hi)


def _f(x, d=3):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def comparison_markdown(results: dict, manifest: str) -> str:
    lines = [
        "# Model comparison (same data, same small CPU budget)",
        "",
        f"Held-out cases: `{manifest}`. Model-space metrics from `ctlanguage.training.report` "
        "(organ/finding Dice on the model grid, case-level AUC, ECE after temperature scaling "
        "on the calibration split, paraphrase AUC with the held-out phrasings as positives).",
        "",
        "| model | steps | mean organ Dice | mean finding Dice | mean finding AUC | ECE | paraphrase AUC | paraphrase drop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('steps')} | {_f(r['mean_organ_dice'])} | {_f(r['mean_finding_dice'])} | "
                     f"{_f(r['mean_finding_auc'])} | {_f(r['ece'])} | {_f(r.get('mean_paraphrase_auc'))} | "
                     f"{_f(r.get('paraphrase_auc_drop'))} |")
    names = list(results)
    ref = names[0]
    if all("_case_level" in r for r in results.values()) and len(names) > 1:
        lines += ["", f"Mean finding AUC difference to **{ref}** (paired bootstrap over the held-out "
                  "cases, 1000 resamples, 95 % interval):", "",
                  "| model | AUC(model) - AUC(" + ref + ") | 95 % interval |", "|---|---|---|"]
        for n_ in names[1:]:
            d, lo, hi = bootstrap_auc_difference(results[n_]["_case_level"], results[ref]["_case_level"])
            lines.append(f"| {n_} | {d:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    findings = sorted({f for r in results.values() for f in r["finding_auc"]})
    lines += ["", "Per-finding AUC:", "", "| finding | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for f in findings:
        lines.append(f"| {f} | " + " | ".join(_f(results[n]["finding_auc"].get(f)) for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=DIR")
    ap.add_argument("--out")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--features", nargs="+", help="cached stage-1 features of the manifest "
                    "(stage-2 models of one encoder): no encoding")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = {}
    for spec in a.models:
        name, d = spec.split("=", 1)
        results[name] = quick_eval(d, a.manifest, a.features)
        print(name, {k: round(v, 4) for k, v in results[name].items() if isinstance(v, float)}, flush=True)
    if a.json:
        plain = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in results.items()}
        Path(a.json).write_text(json.dumps(plain, indent=1, default=float))
    if a.out:
        Path(a.out).write_text(comparison_markdown(results, a.manifest))


if __name__ == "__main__":
    main()

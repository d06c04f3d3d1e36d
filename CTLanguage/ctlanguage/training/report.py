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

import torch

from ..model import GroundedCTModel
from .dataset import ManifestDataset
from .train import collect_predictions, heldout_ensembles, summarize


def quick_eval(model_dir: str | Path, manifest: str | Path) -> dict:
    model = GroundedCTModel.from_pretrained(model_dir, device="cpu")
    ds = ManifestDataset(manifest, model.config.spec, model.config.anatomies,
                         feature_stride=model.config.feature_stride)
    pred = collect_predictions(model, ds, heldout=heldout_ensembles())
    res = summarize(pred, model.config.calibration_temperature, model.config.calibration_bias)
    res["calibration_temperature"] = model.config.calibration_temperature
    res["steps"] = (model.config.training or {}).get("steps")
    res["losses"] = (model.config.training or {}).get("losses")
    return res


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
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = {}
    for spec in a.models:
        name, d = spec.split("=", 1)
        results[name] = quick_eval(d, a.manifest)
        print(name, {k: round(v, 4) for k, v in results[name].items() if isinstance(v, float)}, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=float))
    if a.out:
        Path(a.out).write_text(comparison_markdown(results, a.manifest))


if __name__ == "__main__":
    main()

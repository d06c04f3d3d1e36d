"""`ctlanguage evaluate`: AUC / Dice / ECE / paraphrase tables for one or several models.

    ctlanguage evaluate --model default --data held_out/manifest.jsonl --out eval/
    ctlanguage evaluate --model grounded=Resources/Models/ctlanguage-synth-v2 \\
        --model global-clip=runs/global/model --data held_out/manifest.jsonl --out eval/ \\
        --doc docs/model_comparison.md

Writes DIR/metrics.json, DIR/metrics.md and DIR/metrics.html (with several models: one
comparison table first, then each model's details) and the pictures DIR/figures/*.png (ROC curves
per finding, reliability diagram, Dice per structure; need matplotlib: ctlanguage[eval]), linked
from metrics.md and embedded in metrics.html. ``--doc`` also writes the tables into the docs.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="evaluate models on a manifest (AUC, Dice on the source grid, ECE, paraphrases)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]MODEL",
                   help="model id, folder or 'default'; repeat to compare several models "
                        "(the first is the reference); LABEL= names its column")
    p.add_argument("--data", required=True, metavar="MANIFEST", help="manifest.jsonl of the test cases")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder for metrics.json / .md / .html and figures/")
    p.add_argument("--doc", metavar="FILE", help="also write the (comparison) table to this Markdown file")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when available")
    p.add_argument("--max-cases", type=int, help="evaluate only the first N cases")
    p.add_argument("--threshold", type=float, default=0.5, help="mask threshold (default 0.5)")
    p.add_argument("--paraphrases", metavar="JSON",
                   help="held-out paraphrase set (default: the package's data/paraphrases_heldout.json)")
    p.add_argument("--no-paraphrases", action="store_true", help="skip the paraphrase prompt set")
    p.add_argument("--min-structure-ml", type=float, default=5.0, metavar="ML",
                   help="leave structures smaller than this in a case out of the Dice (default 5)")
    p.add_argument("--min-finding-ml", type=float, default=1.0, metavar="ML",
                   help="leave findings smaller than this in a case out of the Dice (default 1)")
    p.set_defaults(func=run)


def _split_label(spec: str) -> tuple[str | None, str]:
    if "=" in spec:
        label, _, path = spec.partition("=")
        if label and path and "/" not in label:
            return label, path
    return None, spec


def run(args) -> int:
    from .. import evaluation as E
    from .. import evaluation_report as R
    from ..engine import Engine

    quiet = getattr(args, "quiet", False)
    paraphrases = None
    if args.no_paraphrases:
        paraphrases = []
    elif args.paraphrases:
        paraphrases = E.load_paraphrases(args.paraphrases)
    results = {}
    for spec in args.model:
        label, model = _split_label(spec)
        engine = Engine.load(model, device=args.device)
        label = label or engine.model_id
        while label in results:
            label += "'"
        bar = None if quiet else _Bar(f"evaluate {label}")
        try:
            results[label] = E.evaluate_model(
                engine, args.data, paraphrases=paraphrases, max_cases=args.max_cases,
                mask_threshold=args.threshold, min_structure_ml=args.min_structure_ml,
                min_finding_ml=args.min_finding_ml, progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        m = results[label]
        if not quiet:
            print(f"{label}: structure Dice {R.fmt(m['mean_structure_dice'])}, finding Dice "
                  f"{R.fmt(m['mean_finding_dice'])}, AUC {R.fmt(m['mean_finding_auc'])}, ECE "
                  f"{R.fmt(m['ece'])}, paraphrase AUC drop {R.fmt(m['paraphrases']['auc_drop'])}",
                  file=sys.stderr)
    files = R.write_results(results, args.out, doc=args.doc)
    if not quiet:
        for p in files.values():
            print(f"wrote {p}", file=sys.stderr)
    return 0


class _Bar:
    """rich progress bar fed by (fraction, message) callbacks."""

    def __init__(self, title: str):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                 transient=False)
        self.progress.start()
        self.title = title
        self.task = self.progress.add_task(title, total=1.0)

    def update(self, fraction: float, message: str) -> None:
        self.progress.update(self.task, completed=fraction, description=f"{self.title}: {message}")

    def close(self) -> None:
        self.progress.stop()

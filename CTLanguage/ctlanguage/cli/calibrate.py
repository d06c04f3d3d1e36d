"""`ctlanguage calibrate --model ID --data MANIFEST [--name NAME]`: fit per-finding temperature
and offset on your own labelled cases and store them beside the model (or, for an embedded or
read-only model, in the user cache); see ctlanguage/calibration.py and docs/evaluation.md.

    ctlanguage calibrate --model default --data my_site/manifest.jsonl --name "St. Elsewhere 2025"
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="calibrate finding probabilities on your own labelled cases",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="catalog id or model folder (default: the embedded model)")
    p.add_argument("--data", required=True, metavar="MANIFEST",
                   help="manifest.jsonl of the cohort: image + labels per case (masks optional)")
    p.add_argument("--name", help="name shown with calibrated probabilities (default: the manifest's folder name)")
    p.add_argument("--out", metavar="FILE", help="write here instead of beside the model / the user cache")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when available")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from .. import calibration as C
    from ..engine import Engine
    from ..manifest import read_manifest

    read_manifest(args.data)             # a bad manifest fails before the model is loaded
    engine = Engine.load(args.model, device=args.device)
    doc = C.calibrate(engine, args.data, name=args.name)
    info = C.scores_backend(engine).info
    target = Path(args.out) if args.out else C.target_file(info.path, info.id, info.sha256 or "")
    C.write(doc, target)
    if not getattr(args, "quiet", False):
        own = sum(v["fit"] == "own" for v in doc["per_finding"].values())
        before = "raw scores" if doc["ece_before"] is None else f"{doc['ece_before']:.3f}"
        print(f"calibrated {doc['model_id']} on {doc['name']!r}, n={doc['n']}: ECE {before} -> "
              f"{doc['ece_after']:.3f}; {own} of {len(doc['per_finding'])} findings with their own fit "
              f"(others: shared T={doc['temperature']:.3g})", file=sys.stderr)
        print(json.dumps({"file": str(target), "ece_before": doc["ece_before"], "ece_after": doc["ece_after"]}))
    return 0

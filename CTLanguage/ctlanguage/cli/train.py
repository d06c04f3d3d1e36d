"""`ctlanguage train --config FILE` (the model's own calibration runs at the end of training on
the config's calib split; site calibration is `ctlanguage calibrate`, cli/calibrate.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError


def _load_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"The training config {p} does not exist.")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"The training config {p} is not valid JSON ({exc.msg}, line {exc.lineno}).") from exc
    if "data" not in cfg or "train" not in cfg.get("data", {}):
        raise InputError(f"The training config {p} needs data.train.manifest.")
    return cfg


def _train(args) -> int:
    from ..training.train import run_training

    cfg = _load_config(args.config)
    if args.output:
        cfg["output"] = args.output
    if args.steps is not None:
        cfg.setdefault("train", {})["steps"] = args.steps
    if args.no_export:
        cfg.pop("export", None)
    run_training(cfg, config_path=args.config, resume=not args.no_resume, quiet=args.quiet)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a grounded model from a JSON config (torchrun for DDP)")
    p.add_argument("--config", required=True, help="training config JSON (see configs/)")
    p.add_argument("--output", help="override the output folder")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in the output folder")
    p.add_argument("--no-export", action="store_true", help="do not copy the final model to config.export")
    p.set_defaults(func=_train)

"""State of the embedded default model, shared by the tests that need a trained one."""

from __future__ import annotations

import json

from ctlanguage.engine import resolve_model_dir


def default_model_state() -> str:
    """'trained' (calibrated final model), 'preliminary' (integration checkpoint) or 'missing'."""
    try:
        d = resolve_model_dir("default")
        cfg = json.loads((d / "config.json").read_text())
    except Exception:
        return "missing"
    if not (d / "model.safetensors").is_file():
        return "missing"
    if not cfg.get("calibration") or "preliminary" in json.dumps(cfg.get("metrics", {})).lower():
        return "preliminary"
    return "trained"

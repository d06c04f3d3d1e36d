"""Reading a ``manifest.jsonl`` (one JSON object per case, paths relative to the manifest; format
in docs/architecture.md "Manifest") and the presence label a case gives a finding.

Used by training, evaluation and calibration alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InputError


def read_manifest(path: str | Path) -> list[dict]:
    """The cases of a manifest, in file order. InputError (one sentence) when the file is missing,
    a line is not a JSON object, or no case is listed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The manifest {path} does not exist.")
    cases = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"Line {n} of {path} is not valid JSON ({exc.msg}).") from exc
        if not isinstance(case, dict):
            raise InputError(f"Line {n} of {path} is not a JSON object (one case per line).")
        cases.append(case)
    if not cases:
        raise InputError(f"The manifest {path} lists no cases.")
    return cases


def read_structures(case: dict, root: str | Path, shape: tuple) -> tuple:
    """(int32 label map [k, j, i], {label value: anatomy key}) of a case, or (None, {}) when it
    has none. InputError when the map is not on the image grid of ``shape``."""
    from .io import read_ct

    if not case.get("structures"):
        return None, {}
    labels = np.rint(read_ct(Path(root) / case["structures"], validate=False).array).astype(np.int32)
    if labels.shape != tuple(shape):
        raise InputError(f"The structure map of {case.get('case_id', 'a case')} does not match its "
                         "image grid.")
    return labels, {int(k): v for k, v in (case.get("structure_labels") or {}).items()}


def sided_label(case: dict, finding: str, laterality: Optional[str]):
    """Presence label of (finding, side): 1/0, or None when the side of a present finding is
    unknown. Unsided: the case-level label (or whether any finding entry names it)."""
    entries = [f for f in (case.get("findings") or []) if f.get("name") == finding]
    label = (case.get("labels") or {}).get(finding)
    if laterality not in ("left", "right"):
        if label is not None:
            return int(label)
        return int(bool(entries))
    if any(e.get("laterality") in (laterality, "bilateral") for e in entries):
        return 1
    if label == 0 or (label is None and not entries):
        return 0
    if entries and all(e.get("laterality") in ("left", "right") for e in entries):
        return 0  # present, but only on the other side
    return None

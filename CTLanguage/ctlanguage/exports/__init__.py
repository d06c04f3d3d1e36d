"""Exports of query results: NIfTI masks, Slicer .seg.nrrd, DICOM SEG, CSV/JSON table, HTML report.

Everything here works on *finding-like* objects: anything with the attributes of
:class:`ExportFinding` (the engine's ``Finding`` satisfies it) and a volume-like object with
``array`` ([k, j, i]) and ``ijk_to_ras`` (4x4), see docs/architecture.md.

:func:`export_all` writes the whole set into one folder, all-or-nothing (see ``atomic``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import ExportError

__all__ = [
    "ExportFinding",
    "ExportResult",
    "export_all",
    "slugify",
    "unique_slugs",
    "finding_key",
    "finding_color",
]

ProgressFn = Callable[[float, str], None]


@dataclass
class ExportFinding:
    """Minimal finding record the exports need (the engine's Finding has the same attributes)."""

    prompt: str
    mask: np.ndarray  # uint8, volume.array.shape, source grid
    anatomy: str | None = None
    finding: str | None = None
    laterality: str | None = None
    probability: float | None = None
    prompt_confidence: float | None = None
    volume_ml: float | None = None
    codes: dict | None = None
    color: tuple | None = None


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)   # kind -> path ("findings.json", ...)
    masks: list[Path] = field(default_factory=list)
    slugs: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds, filled by callers
    warnings: list[str] = field(default_factory=list)     # exports written with caveats / skipped


# --------------------------------------------------------------------------------------------
# helpers shared by the writers

def slugify(text: str, max_len: int = 60) -> str:
    """File-name-safe ASCII slug of a prompt: 'Fluid around the LEFT lung!' -> 'fluid-around-the-left-lung'."""
    norm = unicodedata.normalize("NFKD", text or "")
    ascii_text = norm.encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "prompt"


def unique_slugs(prompts: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        base = slugify(p)
        n = seen.get(base, 0) + 1
        seen[base] = n
        out.append(base if n == 1 else f"{base}-{n}")
    return out


def finding_key(f: Any) -> str | None:
    """Vocabulary key that describes the segment: the finding when there is one, else the anatomy."""
    return getattr(f, "finding", None) or getattr(f, "anatomy", None)


_FALLBACK_COLORS = [
    (0.90, 0.30, 0.25), (0.25, 0.60, 0.90), (0.30, 0.80, 0.35), (0.95, 0.75, 0.20),
    (0.70, 0.40, 0.85), (0.20, 0.80, 0.80), (0.95, 0.50, 0.70), (0.60, 0.60, 0.30),
]


def finding_color(f: Any, index: int = 0) -> tuple[float, float, float]:
    """Colour as floats in [0, 1] (accepts 0-1 floats or 0-255 ints on the finding)."""
    c = getattr(f, "color", None)
    if c is None:
        key = finding_key(f)
        try:  # vocabulary colours when that module is present
            from .. import vocabulary  # type: ignore

            get = getattr(vocabulary, "color_for", None) or getattr(vocabulary, "color", None)
            c = get(key) if (get and key) else None
        except Exception:  # noqa: BLE001 - optional
            c = None
    if c is None:
        return _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)]
    c = tuple(float(v) for v in list(c)[:3])
    if max(c) > 1.0:
        c = tuple(v / 255.0 for v in c)
    return tuple(min(max(v, 0.0), 1.0) for v in c)  # type: ignore[return-value]


def check_masks(volume: Any, findings: Sequence[Any]) -> None:
    shape = tuple(np.shape(volume.array))
    for f in findings:
        m = getattr(f, "mask", None)
        if m is None:
            continue
        if tuple(m.shape) != shape:
            raise ExportError(
                f"mask of prompt {f.prompt!r} has shape {tuple(m.shape)}, volume has {shape}"
            )


def export_all(volume: Any, findings: Sequence[Any], out_dir: str | Path, **kwargs: Any) -> ExportResult:
    """Write every export for ``findings`` on ``volume`` into ``out_dir`` (all or nothing).

    See :func:`ctlanguage.exports.bundle.export_all` for the keyword arguments."""
    from .bundle import export_all as _export_all

    return _export_all(volume, findings, out_dir, **kwargs)

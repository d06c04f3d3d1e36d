"""One NIfTI mask per prompt, on exactly the source volume's voxel grid.

The array is written as uint8 in the volume's own voxel order (no resampling, no reorientation)
by the project's one mask writer, ``ctlanguage.io.write_mask``: the header carries the volume's
IJK->RAS matrix in ITK's LPS convention, so any viewer places the mask exactly over the CT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_masks(folder: str | Path, findings: list[Any], volume: Any, slugs: list[str],
                progress=None) -> list[Path | None]:
    """``folder/<slug>.nii.gz`` for every finding with a mask; returns the paths (None if no mask)."""
    from ..io import write_mask

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path | None] = []
    n = max(len(findings), 1)
    for idx, (f, slug) in enumerate(zip(findings, slugs)):
        mask = getattr(f, "mask", None)
        out.append(None if mask is None else write_mask(mask, volume, folder / f"{slug}.nii.gz"))
        if progress:
            progress((idx + 1) / n, f"mask {slug}")
    return out

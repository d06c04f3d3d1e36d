"""One NIfTI mask per prompt, on exactly the source volume's voxel grid.

The array is written as uint8 in the volume's own voxel order (no resampling, no reorientation);
the header carries the volume's IJK->RAS matrix (converted to ITK's LPS convention), so any
viewer places the mask exactly over the CT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import ExportError

_LPS = np.diag([-1.0, -1.0, 1.0])


def sitk_geometry(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in ITK's LPS convention from a 4x4 IJK->RAS matrix."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    lin = _LPS @ m[:3, :3]
    origin = _LPS @ m[:3, 3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0):
        raise ExportError("the volume's voxel-to-world matrix has a zero-length axis")
    direction = lin / spacing
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())


def mask_image(mask: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    arr = np.ascontiguousarray(mask, dtype=np.uint8)
    img = sitk.GetImageFromArray(arr)  # [k, j, i] -> image (i, j, k)
    spacing, origin, direction = sitk_geometry(ijk_to_ras)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    try:
        img.SetDirection(direction)
    except RuntimeError:
        raise ExportError(
            "the volume's voxel axes are not orthogonal; NIfTI masks cannot represent this geometry"
        ) from None
    return img


def write_mask_nifti(path: str | Path, mask: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write ``mask`` ([k, j, i] uint8) as a compressed NIfTI with the volume's geometry."""
    path = Path(path)
    img = mask_image(mask, ijk_to_ras)
    try:
        sitk.WriteImage(img, str(path), useCompression=True)
    except RuntimeError as exc:
        # SimpleITK reports I/O errors (disk full, permissions) as RuntimeError.
        raise OSError(f"could not write {path.name}: {str(exc).strip().splitlines()[-1]}") from None
    return path


def write_masks(folder: str | Path, findings: list[Any], slugs: list[str], ijk_to_ras: np.ndarray,
                progress=None) -> list[Path | None]:
    """``folder/<slug>.nii.gz`` for every finding with a mask; returns the paths (None if no mask)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path | None] = []
    n = max(len(findings), 1)
    for idx, (f, slug) in enumerate(zip(findings, slugs)):
        mask = getattr(f, "mask", None)
        if mask is None:
            out.append(None)
        else:
            out.append(write_mask_nifti(folder / f"{slug}.nii.gz", mask, ijk_to_ras))
        if progress:
            progress((idx + 1) / n, f"mask {slug}")
    return out

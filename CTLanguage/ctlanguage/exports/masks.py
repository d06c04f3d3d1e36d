"""One NIfTI mask per prompt, on exactly the source volume's voxel grid.

The array is written as uint8 in the volume's own voxel order (no resampling, no reorientation)
by the project's one mask writer, ``ctlanguage.io.write_mask``, several masks in parallel threads.
For ``.nii.gz`` it calls ``write_mask_nifti`` here: the header (made by nibabel) carries the
volume's IJK->RAS matrix as qform and sform, so any viewer places the mask exactly over the CT,
and the gzip stream is written by ``gzip_stream`` in time proportional to the mask's bounding box
(level 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError


def nifti_header(shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray) -> bytes:
    """NIfTI-1 header + empty extension block (352 bytes) for a uint8 [k, j, i] array whose voxel
    (i, j, k) maps to RAS by ``ijk_to_ras`` (nibabel's affine convention): qform and sform both
    carry the exact geometry (scanner-anatomical, mm), as SimpleITK writes them."""
    import nibabel as nib

    m = np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ExportError("the volume's voxel-to-world matrix has a zero-length axis")
    direction = m[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ExportError(
            "the volume's voxel axes are not orthogonal; NIfTI masks cannot represent this geometry"
        )
    k, j, i = (int(v) for v in shape_kji)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape((i, j, k))
    hdr.set_qform(m, code=1)
    hdr.set_sform(m, code=1)
    hdr.set_xyzt_units("mm")
    hdr.set_data_offset(352)
    return hdr.binaryblock + b"\0\0\0\0"


def write_mask_nifti(path: str | Path, mask: np.ndarray, ijk_to_ras: np.ndarray, extent=None,
                     header: bytes | None = None, compression_level: int = 1) -> Path:
    """Write ``mask`` ([k, j, i], stored as uint8) as a gzipped NIfTI with the volume's geometry.

    Work is proportional to the mask's bounding box (``extent``: its ``MaskExtent``, computed
    when not given); ``header`` (from ``nifti_header``) can be shared by masks of one volume."""
    from .extent import mask_extent
    from .gzip_stream import volume_pieces, write_gzip

    path = Path(path)
    m = np.asarray(mask)
    if m.dtype != np.uint8:
        m = m.astype(np.uint8)
    ext = extent if extent is not None else mask_extent(m)
    head = header if header is not None else nifti_header(m.shape, ijk_to_ras)
    with open(path, "wb") as fh:
        write_gzip(fh, head, volume_pieces(m, ext.box, ext.slices), level=compression_level)
    return path


def write_masks(folder: str | Path, findings: list[Any], volume: Any, slugs: list[str],
                progress=None, extents=None) -> list[Path | None]:
    """``folder/<slug>.nii.gz`` for every finding with a mask; returns the paths (None if no mask).
    Files are written by parallel threads (zlib releases the GIL while it compresses)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..io import write_mask
    from .extent import extents_for

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extents = extents_for(findings, extents)
    todo = [n for n, f in enumerate(findings) if getattr(f, "mask", None) is not None]
    out: list[Path | None] = [None] * len(findings)
    if not todo:
        return out
    with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1, 8))) as pool:
        futures = {n: pool.submit(write_mask, findings[n].mask, volume,
                                  folder / f"{slugs[n]}.nii.gz", extent=extents[n]) for n in todo}
        for done, (n, fut) in enumerate(futures.items()):
            out[n] = fut.result()
            if progress:
                progress((done + 1) / len(todo), f"mask {slugs[n]}")
    return out

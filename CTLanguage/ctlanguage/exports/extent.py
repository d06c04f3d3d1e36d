"""Where a mask is non-empty, found once per finding and shared by the writers.

A prompt's mask covers a small part of a 512 x 512 x 300 volume; the writers (NIfTI, .seg.nrrd,
report images, DICOM SEG) touch only its bounding box and skip its empty slices instead of
scanning 78 M voxels each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskExtent:
    """Bounding box of the non-zero voxels of a [k, j, i] mask (half-open, array order) and
    which k-slices hold any. ``box`` is None for an empty mask."""

    box: tuple[slice, slice, slice] | None
    slices: np.ndarray        # bool [K]: slice k holds a non-zero voxel

    @property
    def empty(self) -> bool:
        return self.box is None

    def bounds(self) -> tuple[int, int, int, int, int, int]:
        """(k0, k1, j0, j1, i0, i1), half-open; all zero for an empty mask."""
        if self.box is None:
            return (0, 0, 0, 0, 0, 0)
        return tuple(v for s in self.box for v in (s.start, s.stop))  # type: ignore[return-value]


def _span(flags: np.ndarray) -> slice | None:
    nz = np.flatnonzero(flags)
    return slice(int(nz[0]), int(nz[-1]) + 1) if nz.size else None


def mask_extent(mask: np.ndarray | None) -> MaskExtent:
    """One pass over the mask (max per k-slice), then only over its non-empty slab."""
    if mask is None:
        return MaskExtent(None, np.zeros(0, bool))
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"expected a [k, j, i] mask, got shape {m.shape}")
    if m.dtype == bool:
        m = m.view(np.uint8)
    elif m.dtype.kind != "u":
        m = (m != 0).view(np.uint8)
    flat = m.reshape(m.shape[0], -1) if m.flags.c_contiguous else None
    per_slice = (flat.max(axis=1) if flat is not None and flat.shape[1] else
                 m.any(axis=(1, 2))).astype(bool)
    ks = _span(per_slice)
    if ks is None:
        return MaskExtent(None, per_slice)
    plane = m[ks].max(axis=0)                    # [J, I]
    js, is_ = _span(plane.any(axis=1)), _span(plane.any(axis=0))
    return MaskExtent((ks, js, is_), per_slice)  # type: ignore[arg-type]


def masks_overlap(a: np.ndarray, ea: MaskExtent, b: np.ndarray, eb: MaskExtent) -> bool:
    """Whether two masks share a voxel, looking only where their bounding boxes intersect."""
    if ea.box is None or eb.box is None:
        return False
    box = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(ea.box, eb.box))
    if any(s.start >= s.stop for s in box):
        return False
    return bool(np.logical_and(a[box], b[box]).any())


def extents_for(findings, extents=None) -> list[MaskExtent]:
    """The given extents (one per finding) or freshly computed ones."""
    if extents is not None:
        extents = list(extents)
        if len(extents) != len(findings):
            raise ValueError("one extent per finding is needed")
        return extents
    return [mask_extent(getattr(f, "mask", None)) for f in findings]

"""Geometry of a stack of DICOM image planes: ordering, consistency checks, gantry tilt.

A stack is a list of :class:`Plane` (one per single-frame file, or one per frame of an Enhanced
multi-frame object). :func:`stack_grid` orders the planes along the slice normal, refuses stacks
that are not one regular volume and returns the exact voxel->RAS matrix. A gantry-tilted stack
(slice positions drift sideways: the true grid is sheared) gets that sheared matrix;
:func:`resample_orthogonal` then resamples it onto an orthogonal grid whose slices are the
acquired slice planes (linear interpolation within each plane, as dicom2nifti and Slicer do).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GeometryError
from .volume import flip_lps_ras

ORIENTATION_TOL = 1e-4   # direction cosines
TILT_TOL_MM = 0.05       # total sideways drift of the slice positions still taken as untilted
GAP_REL_TOL = 0.02       # relative deviation of a slice gap from the usual one


@dataclass
class Plane:
    """One image plane of a series with its geometry (LPS millimetres, as in DICOM)."""

    path: Path
    header: Any                    # pydicom dataset without pixel data
    frame: int | None              # 0-based frame of a multi-frame object; None for single-frame files
    position: np.ndarray           # ImagePositionPatient
    orientation: np.ndarray        # ImageOrientationPatient (row direction, column direction)
    spacing: np.ndarray            # PixelSpacing: [between rows, between columns]
    rows: int
    cols: int
    rescale: tuple[float, float] | None = None  # (slope, intercept) from functional groups

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"


@dataclass
class StackGrid:
    planes: list[Plane]            # ordered along the slice normal
    ijk_to_ras: np.ndarray         # exact grid of the planes (sheared when tilted)
    tilt_deg: float | None = None  # gantry tilt angle when the grid is sheared


def stack_grid(what: str, planes: list[Plane]) -> StackGrid:
    """Order ``planes`` along their normal and derive the exact grid; GeometryError otherwise."""
    if len(planes) < 2:
        from .errors import InputError

        raise InputError(f"{what} has only {len(planes)} image plane; a 3D CT needs several slices.")
    p0 = planes[0]
    iop, rows, cols, spacing = p0.orientation, p0.rows, p0.cols, p0.spacing
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    for p in planes:
        if not np.allclose(p.orientation, iop, atol=ORIENTATION_TOL):
            raise GeometryError(f"{what} mixes slice orientations (first differs at {p.name}); it is not one volume.")
        if p.rows != rows or p.cols != cols:
            raise GeometryError(f"{what} mixes slice sizes ({rows}x{cols} and {p.rows}x{p.cols} at {p.name}).")
        if not np.allclose(p.spacing, spacing, rtol=1e-4):
            raise GeometryError(f"{what} mixes pixel spacings (at {p.name}).")
    positions = np.array([p.position for p in planes])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    planes = [planes[n] for n in order]

    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        n = int(np.argmin(gaps))
        raise GeometryError(
            f"{what} has two slices at the same position ({along[n]:.2f} mm along the slice normal: "
            f"{planes[n].name}, {planes[n + 1].name}); it mixes several acquisitions."
        )
    step = float(np.median(gaps))
    bad = np.abs(gaps - step) > GAP_REL_TOL * step + 1e-3
    if np.any(bad):
        n = int(np.flatnonzero(bad)[0])
        hint = f" (about {round(gaps[n] / step) - 1} missing slice(s))" if gaps[n] > 1.5 * step else ""
        raise GeometryError(
            f"{what} has irregular slice spacing: gap of {gaps[n]:.3f} mm between slices at "
            f"{along[n]:.2f} and {along[n + 1]:.2f} mm where {step:.3f} mm is usual{hint}."
        )
    # sideways drift of the positions (gantry tilt): it must grow steadily with the slice index
    span = along[-1] - along[0]
    lateral = positions - positions[0] - np.outer(along - along[0], normal)
    drift = float(np.max(np.linalg.norm(lateral, axis=1)))
    tilt = None
    if drift > TILT_TOL_MM:
        per_slice = lateral[-1] / (len(planes) - 1)
        off_line = lateral - np.outer(np.arange(len(planes)), per_slice)
        if float(np.max(np.linalg.norm(off_line, axis=1))) > TILT_TOL_MM:
            raise GeometryError(
                f"{what} has slice positions that wander sideways irregularly (up to {drift:.2f} mm); "
                "it is not one regular volume."
            )
        k_vec = (positions[-1] - positions[0]) / (len(planes) - 1)
        tilt = float(np.degrees(np.arctan2(np.linalg.norm(lateral[-1]), span)))
    else:  # untilted: the slice axis is the normal (drift below tolerance is rounding)
        k_vec = normal / np.linalg.norm(normal) * (span / (len(planes) - 1))

    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = k_vec
    lps[:3, 3] = positions[0]
    return StackGrid(planes, flip_lps_ras(lps), tilt)


def resample_orthogonal(array: np.ndarray, ijk_to_ras: np.ndarray, fill: float):
    """Resample a sheared (tilted) stack onto the orthogonal grid spanned by its in-plane axes and
    the slice normal, covering every source voxel. Returns ``(array, ijk_to_ras)``.

    The new k planes are the acquired slice planes (same normal, same positions along it), so
    values are interpolated within each plane only. Outside the acquired data: ``fill``.
    """
    import SimpleITK as sitk

    from .volume import set_sitk_geometry

    m = np.asarray(ijk_to_ras, dtype=np.float64)
    a_i, a_j, a_k = m[:3, 0], m[:3, 1], m[:3, 2]
    normal = np.cross(a_i, a_j)
    normal /= np.linalg.norm(normal)
    if normal @ a_k < 0:
        normal = -normal
    new = np.eye(4)
    new[:3, 0], new[:3, 1], new[:3, 2] = a_i, a_j, normal * float(normal @ a_k)
    n = np.asarray(array.shape[::-1]) - 1
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=np.float64)
    ras = corners @ m[:3, :3].T + m[:3, 3]
    idx = (ras - m[:3, 3]) @ np.linalg.inv(new[:3, :3]).T  # corners in new-grid index units
    lo = np.floor(idx.min(0) + 1e-6)
    hi = np.ceil(idx.max(0) - 1e-6)
    new[:3, 3] = m[:3, 3] + new[:3, :3] @ lo
    size = (hi - lo + 1).astype(int)  # along i, j, k

    src = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    set_sitk_geometry(src, m)
    ref = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    set_sitk_geometry(ref, new)
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, float(fill), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out), new

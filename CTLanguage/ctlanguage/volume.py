"""CTVolume: a CT image as HU voxels plus the exact voxel -> RAS affine and its provenance.

Conventions (docs/architecture.md): ``array`` is float32 HU indexed ``[k, j, i]``; ``ijk_to_ras``
maps ``(i, j, k, 1)`` to RAS millimetres (Slicer's IJKToRASMatrix). ITK / DICOM / NRRD work in
LPS; conversion flips the sign of the first two rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])   # its own inverse: also RAS -> LPS
MIN_VOXELS_PER_AXIS = 8


@dataclass
class CTVolume:
    array: np.ndarray                 # float32 HU, [k, j, i]
    ijk_to_ras: np.ndarray            # 4x4 float64
    source: str | None = None         # file or folder it was read from
    modality: str | None = None       # DICOM Modality when known ("CT")
    series_uid: str | None = None
    study_uid: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.dtype != np.float32:
            self.array = self.array.astype(np.float32)
        self.ijk_to_ras = np.array(self.ijk_to_ras, dtype=np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise InputError(f"the voxel-to-RAS matrix must be 4x4, got {self.ijk_to_ras.shape}")

    # ---- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (i, j, k)."""
        return voxel_spacing(self.ijk_to_ras)

    @property
    def origin_ras(self) -> np.ndarray:
        """RAS position of the centre of voxel (0, 0, 0)."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of the i, j, k axes."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.ijk_to_ras[:3, :3]))) / 1000.0

    @classmethod
    def grid_only(cls, shape, ijk_to_ras: np.ndarray) -> "CTVolume":
        """A volume that only carries a grid (a read-only broadcast view: no voxel memory), for
        mapping masks onto a grid whose voxels are not at hand."""
        return cls(np.broadcast_to(np.float32(-1000.0), tuple(int(s) for s in shape)),
                   np.asarray(ijk_to_ras, dtype=np.float64))

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (i, j, k) -> (N, 3) RAS mm."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        ras = np.asarray(ras, dtype=np.float64).reshape(-1, 3)
        inv = np.linalg.inv(self.ijk_to_ras)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    # ---- identity ---------------------------------------------------------------------------
    def content_hash(self) -> str:
        """sha256 over shape, voxel bytes and affine (stable across runs and machines)."""
        h = hashlib.sha256()
        h.update(repr(self.array.shape).encode())
        h.update(np.ascontiguousarray(self.array, dtype="<f4").data)
        h.update(np.ascontiguousarray(self.ijk_to_ras, dtype="<f8").data)
        return h.hexdigest()

    # ---- checks -----------------------------------------------------------------------------
    def validate(self) -> "CTVolume":
        """Raise InputError unless this looks like a usable 3D CT in HU. Returns self."""
        name = f" in {self.source}" if self.source else ""
        a = self.array
        if a.ndim != 3:
            raise InputError(f"expected a 3D CT volume{name}, got a {a.ndim}D array "
                             f"of shape {a.shape}")
        if a.size == 0:
            raise InputError(f"the CT volume{name} is empty (shape {a.shape})")
        if min(a.shape) < MIN_VOXELS_PER_AXIS:
            raise InputError(f"the CT volume{name} is too small: shape {a.shape} has fewer than "
                             f"{MIN_VOXELS_PER_AXIS} voxels along an axis")
        if self.modality and self.modality.upper() != "CT":
            raise InputError(f"the image{name} has modality {self.modality}, not CT")
        m = self.ijk_to_ras[:3, :3]
        if not np.all(np.isfinite(self.ijk_to_ras)) or abs(np.linalg.det(m)) < 1e-9:
            raise InputError(f"the voxel-to-RAS matrix{name} is not invertible or not finite")
        if np.any(self.spacing < 1e-3):
            raise InputError(f"the voxel spacing{name} is degenerate: {self.spacing}")
        shear = shear_description(self.ijk_to_ras)
        if shear:
            raise InputError(
                f"the voxel grid{name} is sheared ({shear}); only grids with perpendicular axes are "
                "supported (exports could not lie on it exactly): resample the image onto an "
                "orthogonal grid first")
        # min/max propagate NaN; checked separately for a precise message
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise nonfinite_error(int(np.count_nonzero(~np.isfinite(a))), self.source)
        if lo > -500.0:
            raise InputError(
                f"the values{name} do not look like CT Hounsfield units: the minimum is {lo:g} "
                "(no air below -500 HU; an MR image or unrescaled raw data?)")
        if hi - lo < 100.0:
            raise InputError(f"the CT volume{name} is nearly constant ({lo:g}..{hi:g} HU)")
        # padding outside the scan field is often -3024 and can be as low as int16's -32768
        if lo < -32768.0 or hi > 40000.0:
            raise InputError(f"the values{name} range {lo:g}..{hi:g}, which is not a HU range")
        return self

    # ---- SimpleITK ---------------------------------------------------------------------------
    def to_sitk(self, array: np.ndarray | None = None):
        """SimpleITK image (LPS) with this volume's grid; ``array`` replaces the voxels if given."""
        import SimpleITK as sitk

        data = self.array if array is None else np.asarray(array)
        if data.shape != self.array.shape:
            raise InputError(f"array shape {data.shape} does not match the volume {self.shape}")
        img = sitk.GetImageFromArray(data)
        set_sitk_geometry(img, self.ijk_to_ras)
        return img

    @classmethod
    def from_sitk(cls, image, **provenance) -> "CTVolume":
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise InputError(f"expected a 3D image, got {image.GetDimension()}D "
                             f"of size {image.GetSize()}")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("expected a scalar (grey-value) CT image, got "
                             f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
        arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        return cls(arr, sitk_ijk_to_ras(image), **provenance)


def voxel_spacing(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Voxel size in mm along (i, j, k): the lengths of the matrix's first three columns."""
    return np.linalg.norm(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3], axis=0)


def flip_lps_ras(a: np.ndarray) -> np.ndarray:
    """RAS <-> LPS (the flip is its own inverse) of a 4x4 voxel-to-world matrix, or of points or
    vectors (..., 3). ITK, DICOM and NRRD use LPS; CTVolume and Slicer use RAS."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape == (4, 4):
        return LPS_TO_RAS @ a
    if a.shape[-1:] != (3,):
        raise ValueError(f"expected a 4x4 matrix or (..., 3) points, got shape {a.shape}")
    return a * LPS_TO_RAS.diagonal()[:3]


def sitk_geometry(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, LPS origin, row-major LPS direction) of a voxel->RAS matrix, as SimpleITK wants.
    ValueError when an axis has zero length."""
    lps = flip_lps_ras(ijk_to_ras)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError("the voxel-to-world matrix has a zero-length axis")
    direction = lps[:3, :3] / spacing
    return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())


# cosine of the angle between two voxel axes still taken as perpendicular: header rounding
# (6 decimals) gives ~1e-6; ITK's NIfTI writer straightens anything above ~1e-5 (0.05 mm at 500 mm)
SHEAR_TOL = 1e-4


def shear_description(ijk_to_ras: np.ndarray) -> str | None:
    """None for perpendicular voxel axes, else which axes meet at which angle."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    d = m / np.linalg.norm(m, axis=0)
    cos = d.T @ d
    worst = max(((a, b) for a in range(3) for b in range(a + 1, 3)), key=lambda ab: abs(cos[ab]))
    if abs(cos[worst]) <= SHEAR_TOL:
        return None
    angle = float(np.degrees(np.arccos(np.clip(cos[worst], -1.0, 1.0))))
    return f"its {'ijk'[worst[0]]} and {'ijk'[worst[1]]} axes meet at {angle:.2f} degrees, not 90"


def nonfinite_error(n_bad: int, source: str | None) -> InputError:
    """The refusal for NaN/Inf voxels (one wording for every format)."""
    name = f" in {source}" if source else ""
    return InputError(f"the CT volume{name} contains {n_bad} NaN or infinite voxel values")


def sitk_ijk_to_ras(image) -> np.ndarray:
    """4x4 voxel->RAS matrix of a 3D SimpleITK image."""
    d = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.array(image.GetSpacing(), dtype=np.float64)
    m[:3, 3] = image.GetOrigin()
    return flip_lps_ras(m)


def set_sitk_geometry(image, ijk_to_ras: np.ndarray) -> None:
    """Give a 3D SimpleITK image the grid described by a voxel->RAS matrix (ValueError when an
    axis has zero length or two axes are parallel: ITK refuses a singular direction)."""
    spacing, origin, direction = sitk_geometry(ijk_to_ras)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    try:
        image.SetDirection(direction)
    except RuntimeError:
        raise ValueError("the voxel axes are degenerate (parallel); this grid cannot be stored as "
                         "an ITK image (NIfTI/NRRD)") from None


def closest_ras(volume: CTVolume) -> CTVolume:
    """The same voxels with the array axes permuted/flipped so that i, j, k run as close as possible
    to +R, +A, +S (array ``[S, A, R]``; nibabel's closest canonical orientation): no resampling, a
    view of the array, the voxel->RAS matrix adjusted so every voxel keeps its position."""
    d = np.abs(volume.direction)             # rows: R, A, S; columns: voxel axes i, j, k
    ras_of = [-1, -1, -1]                    # voxel axis -> RAS axis, largest cosines first
    for flat in np.argsort(-d, axis=None):
        r, a = divmod(int(flat), 3)
        if ras_of[a] < 0 and r not in ras_of:
            ras_of[a] = r
    axis_of = [ras_of.index(r) for r in range(3)]          # RAS axis -> voxel axis
    n = volume.shape[::-1]                                 # voxels along i, j, k
    m = np.zeros((4, 4))                                   # new (i, j, k, 1) -> old (i, j, k, 1)
    m[3, 3] = 1.0
    arr = volume.array.transpose([2 - axis_of[2 - ax] for ax in range(3)])
    for r, a in enumerate(axis_of):
        if volume.direction[r, a] >= 0:
            m[a, r] = 1.0
        else:
            m[a, r], m[a, 3] = -1.0, n[a] - 1
            arr = np.flip(arr, axis=2 - r)
    return CTVolume(arr, volume.ijk_to_ras @ m, source=volume.source, modality=volume.modality,
                    series_uid=volume.series_uid, study_uid=volume.study_uid,
                    metadata=dict(volume.metadata))

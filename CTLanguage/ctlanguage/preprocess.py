"""Model-space preprocessing and its exact inverse.

``to_model_space`` resamples a CT onto a RAS-aligned isotropic grid (array axes ``[S, A, R]``,
i.e. ``[k, j, i]`` with i along R), crops it to the body (largest connected component above a
HU threshold, plus a margin), pads it to a multiple of ``pad_multiple`` and maps the HU window to
[0, 1]. The grid is derived only from the physical extent of the input, so every axis
permutation/flip of the same volume gives the same model-space array.

``ModelGrid`` carries the model grid's own ``ijk_to_ras``; ``ModelGrid.to_source`` maps any
model-space array (probabilities, logits, labels) back onto the source grid (``resample``, the
only way back).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import InputError
from .resample import aligned_axes, grid_to_source, sitk_image, sitk_resample
from .volume import CTVolume

log = logging.getLogger(__name__)

AIR_HU = -1024.0
_EPS = 1e-6


@dataclass
class ModelSpec:
    """Preprocessing parameters of a model (stored in the model's config.json)."""

    spacing_mm: float = 3.0
    hu_min: float = -1000.0
    hu_max: float = 1000.0
    body_threshold_hu: float = -500.0
    margin_mm: float = 12.0
    pad_multiple: int = 16
    max_extent_mm: tuple[float, float, float] = (480.0, 480.0, 600.0)  # along (R, A, S)
    antialias: bool = True  # Gaussian pre-filter where the source is finer than the model grid

    def __post_init__(self):
        self.max_extent_mm = tuple(float(v) for v in self.max_extent_mm)
        if len(self.max_extent_mm) != 3 or min(self.max_extent_mm) <= 0:
            raise ValueError(f"max_extent_mm must be three positive numbers, got {self.max_extent_mm}")
        if self.spacing_mm <= 0 or self.hu_max <= self.hu_min or int(self.pad_multiple) < 1:
            raise ValueError(f"invalid ModelSpec {self}")
        self.pad_multiple = int(self.pad_multiple)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_extent_mm"] = list(self.max_extent_mm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelSpec keys: {sorted(unknown)}")
        return cls(**d)


def _grid_affine(spacing: float, origin_ras) -> np.ndarray:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin_ras
    return affine


@dataclass
class ModelGrid:
    """A voxel grid in model space: array shape ``(D, H, W)`` and its 4x4 ``ijk_to_ras``."""

    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray

    def __post_init__(self):
        self.shape = tuple(int(v) for v in self.shape)
        self.ijk_to_ras = np.array(self.ijk_to_ras, dtype=np.float64).reshape(4, 4)

    def __eq__(self, other) -> bool:  # the dataclass default compares arrays ambiguously
        return (isinstance(other, ModelGrid) and self.shape == other.shape
                and bool(np.allclose(self.ijk_to_ras, other.ijk_to_ras, rtol=0, atol=1e-9)))

    __hash__ = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0).tolist())

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "ijk_to_ras": self.ijk_to_ras.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelGrid":
        return cls(tuple(d["shape"]), np.asarray(d["ijk_to_ras"], dtype=np.float64))

    def scaled(self, factor: int = 2) -> "ModelGrid":
        """Grid of a feature map downsampled by ``factor`` (block-pooling alignment).

        Feature voxel ``n`` covers model voxels ``factor*n .. factor*n + factor-1``; its centre is
        their mean, so the new origin moves by ``(factor-1)/2`` model voxels.
        """
        factor = int(factor)
        if factor < 1 or any(s % factor for s in self.shape):
            raise ValueError(f"grid shape {self.shape} is not divisible by {factor}")
        affine = self.ijk_to_ras.copy()
        affine[:3, 3] = self.ijk_to_ras[:3, :3] @ np.full(3, (factor - 1) / 2.0) + self.ijk_to_ras[:3, 3]
        affine[:3, :3] *= factor
        return ModelGrid(tuple(s // factor for s in self.shape), affine)

    # --- source -> model -----------------------------------------------------------------
    def labels_to_model(self, labels: np.ndarray, volume: CTVolume) -> np.ndarray:
        """Nearest-neighbour resampling of a label map on ``volume``'s grid onto this grid."""
        labels = np.asarray(labels)
        if labels.shape != volume.shape:
            raise InputError(f"Label map shape {labels.shape} does not match the volume shape {volume.shape}.")
        if labels.dtype == bool:
            labels = labels.astype(np.uint8)
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"A label map must have an integer type, got {labels.dtype}.")
        image = sitk_image(labels, volume.ijk_to_ras)
        return sitk_resample(image, self.shape, self.ijk_to_ras, nearest=True, default=0)

    def to_source(self, array: np.ndarray, volume: CTVolume, mode: str = "linear",
                  threshold: float | None = None, fill_value: float = 0.0) -> np.ndarray:
        """``resample.grid_to_source`` on this grid."""
        return grid_to_source(array, self, volume, mode, threshold, fill_value)


@dataclass
class ModelImage:
    """Preprocessed image: float32 ``array`` [D, H, W] in [0, 1] on ``grid``."""

    array: np.ndarray
    grid: ModelGrid
    spec: ModelSpec | None = None


def _full_lattice(volume: CTVolume, spacing: float) -> ModelGrid:
    """RAS-aligned lattice centred on the RAS bounding box of the voxel centres (inside it)."""
    n = np.asarray(volume.shape[::-1]) - 1  # max index along i, j, k
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=np.float64)
    ras = volume.ijk_to_ras_points(corners)
    lo, hi = ras.min(0), ras.max(0)
    count = np.floor((hi - lo) / spacing + _EPS).astype(int) + 1  # along R, A, S
    origin = (lo + hi) / 2.0 - (count - 1) / 2.0 * spacing
    return ModelGrid(tuple(count[::-1]), _grid_affine(spacing, origin))


def _largest_component_bbox(mask: np.ndarray):
    """Index bounding box (lo, hi inclusive, array order) of the largest 6-connected component."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    best = int(np.argmax(counts))
    sl = ndimage.find_objects(labels)[best - 1]
    return np.array([s.start for s in sl]), np.array([s.stop - 1 for s in sl])


def _inside_hull(grid: ModelGrid, volume: CTVolume, tol: float = 1e-3) -> np.ndarray:
    """Boolean [D,H,W]: grid points inside the hull of the source voxel centres (symmetric test)."""
    m = np.linalg.inv(volume.ijk_to_ras) @ grid.ijk_to_ras  # grid (i,j,k) -> source (i,j,k)
    g = [np.arange(s, dtype=np.float64) for s in grid.shape[::-1]]  # along grid i, j, k
    n = np.asarray(volume.shape[::-1]) - 1
    inside = np.ones(grid.shape, dtype=bool)
    for a in range(3):
        idx = (m[a, 0] * g[0][None, None, :] + m[a, 1] * g[1][None, :, None]
               + m[a, 2] * g[2][:, None, None] + m[a, 3])
        inside &= (idx >= -tol) & (idx <= n[a] + tol)
    return inside


def _smoothed_source_box(volume: CTVolume, grid: ModelGrid, spec: ModelSpec):
    """SimpleITK image of the part of ``volume`` that ``grid`` needs, Gaussian pre-filtered.

    Only source axes finer than the model spacing are smoothed, with sigma = (s_model - s_src)/2
    (in mm), a standard anti-aliasing choice for downsampling.
    """
    src_spacing = np.asarray(volume.spacing)
    sigma = _antialias_sigma_mm(volume, spec)
    support = np.ceil(4.0 * sigma / src_spacing).astype(int) + 2
    d = np.asarray(grid.shape[::-1]) - 1
    corners = np.array([[a, b, c] for a in (0, d[0]) for b in (0, d[1]) for c in (0, d[2])], dtype=np.float64)
    src = volume.ras_to_ijk_points(corners @ grid.ijk_to_ras[:3, :3].T + grid.ijk_to_ras[:3, 3])
    size = np.asarray(volume.shape[::-1])
    lo = np.clip(np.floor(src.min(0)).astype(int) - support, 0, size - 1)
    hi = np.clip(np.ceil(src.max(0)).astype(int) + support, 0, size - 1)
    box = volume.array[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
    affine = volume.ijk_to_ras.copy()
    affine[:3, 3] = volume.ijk_to_ras[:3, :3] @ lo + volume.ijk_to_ras[:3, 3]
    # discrete float32 Gaussian per voxel axis (scipy; ~4x faster than ITK's recursive filter,
    # which works in double) with clamped edges, like the separable fast path
    from scipy import ndimage

    box = np.asarray(box, dtype=np.float32)
    for axis in range(3):
        if sigma[axis] > 0 and box.shape[2 - axis] >= 4:
            box = ndimage.gaussian_filter1d(box, sigma[axis] / src_spacing[axis], axis=2 - axis,
                                            output=np.float32, mode="nearest", truncate=3.0)
    return sitk_image(box, affine)


# Body detection runs on the model lattice over the whole image; an image whose lattice would
# exceed this many voxels (e.g. a header with 50 mm voxels: metres of extent) is searched on a
# proportionally coarser lattice instead, and only the body box is resampled finely (bounded memory).
DETECT_MAX_VOXELS = 1 << 24
# A body box larger than this (mm along R, A, S) is no patient: the header's spacing is wrong.
MAX_BODY_EXTENT_MM = (1000.0, 1000.0, 2500.0)


def to_model_space(volume: CTVolume, spec: ModelSpec | None = None, validate: bool = True) -> ModelImage:
    """Resample, crop to the body, pad and normalise a CT for the model (see module docstring)."""
    import SimpleITK as sitk

    spec = spec or ModelSpec()
    if validate:
        volume.validate()
    s = float(spec.spacing_mm)
    air = min(AIR_HU, spec.hu_min, spec.body_threshold_hu - 1.0)

    # 1. body detection on the full lattice (plain linear resampling is enough here)
    full = _full_lattice(volume, s)
    factor = max(1, math.ceil((np.prod(full.shape, dtype=np.float64) / DETECT_MAX_VOXELS) ** (1 / 3) - _EPS))
    fast = None
    if factor == 1:
        # axis-aligned sources (nearly all CTs): anti-aliased resampling in one separable pass
        # whose result is cut to the final grid below; oblique sources: SimpleITK in two steps
        fast = _smoothed_aligned(volume, full, _antialias_sigma_mm(volume, spec), air)
        detect = full
    else:  # coarse lattice; its voxel n is voxel factor * n of the (never built) full lattice
        detect = _full_lattice(volume, s * factor)
        full = ModelGrid(tuple((np.asarray(detect.shape) - 1) * factor + 1),
                         _grid_affine(s, detect.ijk_to_ras[:3, 3]))
    if fast is not None:
        coarse = fast
    else:
        coarse = sitk_resample(sitk_image(volume.array, volume.ijk_to_ras), detect.shape,
                               detect.ijk_to_ras, nearest=False, default=air,
                           pixel_type=sitk.sitkFloat32)
    bbox = _largest_component_bbox(coarse > spec.body_threshold_hu)
    if fast is None:
        del coarse
    name = f" {volume.source}" if volume.source else ""
    if bbox is None:
        raise InputError(f"No body found in the volume{name}: no voxel is above {spec.body_threshold_hu:g} HU.")
    extent = ((bbox[1] - bbox[0] + 1) * s * factor)[::-1]  # mm along R, A, S
    if np.any(extent > np.asarray(MAX_BODY_EXTENT_MM)):
        raise InputError(
            f"The body in the volume{name} would span {' x '.join(f'{v:.0f}' for v in extent)} mm "
            f"(R x A x S), more than any patient ({' x '.join(f'{v:.0f}' for v in MAX_BODY_EXTENT_MM)} mm); "
            f"the voxel spacing {' x '.join(f'{v:g}' for v in volume.spacing)} mm in its header is "
            "probably wrong.")
    lo, hi = bbox[0] * factor - (factor - 1), bbox[1] * factor + (factor - 1)  # whole coarse voxels
    margin = math.ceil(spec.margin_mm / s - _EPS)
    lo, hi = lo - margin, hi + margin

    # 2. cap the extent (centred on the body box), then pad to a multiple (centred)
    max_vox = np.floor(np.asarray(spec.max_extent_mm[::-1]) / s + _EPS).astype(int)
    size = hi - lo + 1
    over = size > max_vox
    if np.any(over):
        log.warning("Body extent %s mm exceeds the model maximum %s mm; cropping around its centre.",
                    (size * s)[::-1].round(1).tolist(), list(spec.max_extent_mm))
        lo = np.where(over, lo + (size - max_vox) // 2, lo)
        size = np.minimum(size, max_vox)
    m = spec.pad_multiple
    final = -(-size // m) * m
    lo = lo - (final - size) // 2
    origin = full.ijk_to_ras[:3, :3] @ lo[::-1].astype(np.float64) + full.ijk_to_ras[:3, 3]
    grid = ModelGrid(tuple(int(v) for v in final), _grid_affine(s, origin))

    # 3. anti-aliased resampling of the needed source box onto the final grid
    if fast is not None:  # the final grid is the full lattice shifted by whole voxels
        hu = np.full(grid.shape, air, dtype=np.float32)
        src_lo, src_hi = np.maximum(lo, 0), np.minimum(lo + final, full.shape)
        hu[tuple(slice(a - b, c - b) for a, c, b in zip(src_lo, src_hi, lo))] = \
            fast[tuple(slice(a, c) for a, c in zip(src_lo, src_hi))]
    else:
        image = _smoothed_source_box(volume, grid, spec)
        hu = sitk_resample(image, grid.shape, grid.ijk_to_ras, nearest=False, default=air,
                       pixel_type=sitk.sitkFloat32)
        hu[~_inside_hull(grid, volume)] = air  # ITK's half-open buffer test is not flip-symmetric
    np.clip(hu, spec.hu_min, spec.hu_max, out=hu)
    hu -= spec.hu_min
    hu *= 1.0 / (spec.hu_max - spec.hu_min)
    return ModelImage(hu.astype(np.float32, copy=False), grid, spec)


# --- fast path for axis-aligned grids ------------------------------------------------------------
def _antialias_sigma_mm(volume: CTVolume, spec: ModelSpec) -> np.ndarray:
    """Gaussian sigma (mm) per source axis (i, j, k): (s_model - s_src) / 2 where the source is
    finer than the model grid, else 0."""
    src = np.asarray(volume.spacing, dtype=np.float64)
    sigma = np.where(src < spec.spacing_mm, (spec.spacing_mm - src) / 2.0, 0.0)
    return sigma if spec.antialias else np.zeros(3)


def _smoothed_aligned(volume: CTVolume, grid: ModelGrid, sigma_mm: np.ndarray, air: float):
    """Gaussian pre-filter + linear interpolation of ``volume`` onto ``grid`` as one separable
    linear map per axis (three matrix products), or None when the axes are not aligned.

    Positions outside the hull of the source voxel centres get ``air``; the filter clamps at the
    edges. Both rules are symmetric, so axis flips/permutations give the same result."""
    amap = aligned_axes(volume.ijk_to_ras, grid.ijk_to_ras)  # per grid axis: source axis, scale, off
    if amap is None:
        return None
    t = np.asarray(volume.array, dtype=np.float32)
    valid = np.ones((1, 1, 1), dtype=bool)
    src_axis_of = {}  # source voxel axis -> grid voxel axis
    for g_ax, (s_ax, scale, offset) in enumerate(amap):
        src_axis_of[s_ax] = g_ax
    # reduce the longest source axes first: later products then work on smaller arrays
    for s_ax in sorted(range(3), key=lambda a: -t.shape[2 - a]):
        g_ax = src_axis_of[s_ax]
        _, scale, offset = amap[g_ax]
        n_in = t.shape[2 - s_ax]
        pos = scale * np.arange(grid.shape[2 - g_ax], dtype=np.float64) + offset
        w, ok = _smooth_interp_matrix(pos, n_in, sigma_mm[s_ax] / volume.spacing[s_ax])
        t = _apply_along(t, w, 2 - s_ax)
        shape = [1, 1, 1]
        shape[2 - s_ax] = -1
        valid = valid & ok.reshape(shape)
    t = np.where(valid, t, np.float32(air)).astype(np.float32, copy=False)
    # array axis (2 - s_ax) now holds grid axis g_ax; move it to array axis (2 - g_ax)
    order = [0, 0, 0]
    for s_ax, g_ax in src_axis_of.items():
        order[2 - g_ax] = 2 - s_ax
    return np.ascontiguousarray(t.transpose(order))


def _smooth_interp_matrix(pos: np.ndarray, n_in: int, sigma_vox: float, tol: float = 1e-3):
    """Dense [len(pos), n_in] weights: sample at continuous index ``pos`` the signal smoothed by a
    normalised discrete Gaussian (clamped edges), with linear interpolation between samples."""
    ok = (pos >= -tol) & (pos <= n_in - 1 + tol)
    p = np.clip(pos, 0.0, n_in - 1.0)
    i0 = np.minimum(np.floor(p).astype(np.intp), max(n_in - 2, 0))
    f = p - i0
    radius = int(math.ceil(3.0 * sigma_vox)) if sigma_vox > 1e-3 else 0
    offsets = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (offsets / sigma_vox) ** 2) if radius else np.ones(1)
    g /= g.sum()
    w = np.zeros((len(pos), n_in), dtype=np.float64)
    rows = np.arange(len(pos))
    for base, wt in ((i0, 1.0 - f), (np.minimum(i0 + 1, n_in - 1), f)):
        for d, gd in zip(offsets, g):
            np.add.at(w, (rows, np.clip(base + d, 0, n_in - 1)), wt * gd)
    return w.astype(np.float32), ok


def _apply_along(t: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Contract array axis ``axis`` of ``t`` with ``w`` [n_out, n_in] (BLAS matrix products)."""
    if axis == 2:
        d0, d1, n = t.shape
        return (np.ascontiguousarray(t).reshape(-1, n) @ w.T).reshape(d0, d1, -1)
    if axis == 1:  # per-slice 2D products (numpy's broadcast matmul does not use BLAS well)
        out = np.empty((t.shape[0], w.shape[0], t.shape[2]), dtype=np.float32)
        for k in range(t.shape[0]):
            np.matmul(w, t[k], out=out[k])
        return out
    n, d1, d2 = t.shape
    return (w @ np.ascontiguousarray(t).reshape(n, -1)).reshape(-1, d1, d2)

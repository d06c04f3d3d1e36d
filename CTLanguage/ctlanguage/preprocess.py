"""Model-space preprocessing and its exact inverse.

``to_model_space`` resamples a CT onto a RAS-aligned isotropic grid (array axes ``[S, A, R]``,
i.e. ``[k, j, i]`` with i along R), crops it to the body (largest connected component above a
HU threshold, plus a margin), pads it to a multiple of ``pad_multiple`` and maps the HU window to
[0, 1]. The grid is derived only from the physical extent of the input, so every axis
permutation/flip of the same volume gives the same model-space array.

``ModelGrid`` carries the model grid's own ``ijk_to_ras``; ``ModelGrid.to_source`` maps any
model-space array (probabilities, logits, labels) back onto the source grid with SimpleITK.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import InputError
from .volume import CTVolume, set_sitk_geometry, sitk_geometry

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


def _sitk_image(array: np.ndarray, ijk_to_ras: np.ndarray):
    import SimpleITK as sitk

    arr = np.ascontiguousarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    image = sitk.GetImageFromArray(arr)
    set_sitk_geometry(image, ijk_to_ras)
    return image


def _resample(image, shape, ijk_to_ras, nearest: bool, default: float, pixel_type=None) -> np.ndarray:
    """Resample a SimpleITK image onto the grid (shape [k,j,i], ijk_to_ras); returns a numpy array."""
    import SimpleITK as sitk

    spacing, origin, direction = sitk_geometry(ijk_to_ras)
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(
        image, [int(shape[2]), int(shape[1]), int(shape[0])], sitk.Transform(), interp,
        origin, spacing, direction, float(default),
        pixel_type if pixel_type is not None else image.GetPixelID(),
    )
    return sitk.GetArrayFromImage(out)


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
        image = _sitk_image(labels, volume.ijk_to_ras)
        return _resample(image, self.shape, self.ijk_to_ras, nearest=True, default=0)

    # --- model -> source -----------------------------------------------------------------
    def to_source(self, array: np.ndarray, volume: CTVolume, mode: str = "linear",
                  threshold: float | None = None, fill_value: float = 0.0) -> np.ndarray:
        """Map an array on this grid back onto ``volume``'s voxel grid.

        Without ``threshold`` returns the resampled array (float32 for linear mode, the input
        dtype for nearest mode); outside this grid the value is ``fill_value``.
        With ``threshold`` returns a uint8 mask (resampled value >= threshold); only the bounding
        box of the above-threshold region (plus interpolation support) is resampled.
        """
        array = np.asarray(array)
        if tuple(array.shape) != self.shape:
            raise InputError(f"Array shape {array.shape} does not match the model grid shape {self.shape}.")
        if mode not in ("linear", "nearest"):
            raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
        nearest = mode == "nearest"
        if array.dtype == bool:
            array = array.astype(np.uint8)
        if not nearest and array.dtype != np.float32:
            array = array.astype(np.float32)

        if threshold is None:
            axis_map = _axis_map(self.ijk_to_ras, volume.ijk_to_ras)
            if axis_map is not None:  # aligned grids: separable, slab by slab (bounded memory)
                return _resample_aligned_full(array, axis_map, volume.shape, nearest, fill_value)
            image = _sitk_image(array, self.ijk_to_ras)
            # fill_value: what lies outside the model grid (e.g. a very negative logit)
            return _resample(image, volume.shape, volume.ijk_to_ras, nearest, default=fill_value)

        out = np.zeros(volume.shape, dtype=np.uint8)
        above = np.argwhere(array >= threshold)
        if above.size == 0:
            return out
        # model-grid index box (array order k,j,i) of the above-threshold voxels, widened by one
        # voxel: outside it, interpolated values are below threshold (nearest: outside it,
        # the nearest voxel is below threshold too).
        lo = np.maximum(above.min(0) - 1, 0)
        hi = np.minimum(above.max(0) + 1, np.asarray(self.shape) - 1)
        sub = array[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
        sub_affine = self.ijk_to_ras.copy()
        sub_affine[:3, 3] = self.ijk_to_ras[:3, :3] @ lo[::-1] + self.ijk_to_ras[:3, 3]
        # source index box covering that region (corners in (i,j,k) order)
        # half a grid voxel beyond the outer nodes: where the sub-array touches the grid border,
        # source voxels up to there still take the edge value (ITK's half-voxel rule)
        corners = np.array([[a, b, c] for a in (lo[2] - 0.5, hi[2] + 0.5) for b in (lo[1] - 0.5, hi[1] + 0.5)
                            for c in (lo[0] - 0.5, hi[0] + 0.5)], dtype=np.float64)
        ras = corners @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]
        src = volume.ras_to_ijk_points(ras)
        size_ijk = np.asarray(volume.shape[::-1])
        s_lo = np.clip(np.floor(src.min(0)).astype(int) - 1, 0, size_ijk - 1)
        s_hi = np.clip(np.ceil(src.max(0)).astype(int) + 1, 0, size_ijk - 1)
        if np.any(src.max(0) < -1) or np.any(src.min(0) > size_ijk):
            return out  # region lies entirely outside the source volume
        box_affine = volume.ijk_to_ras.copy()
        box_affine[:3, 3] = volume.ijk_to_ras[:3, :3] @ s_lo + volume.ijk_to_ras[:3, 3]
        box_shape = tuple((s_hi - s_lo + 1)[::-1])
        box = (slice(s_lo[2], s_hi[2] + 1), slice(s_lo[1], s_hi[1] + 1), slice(s_lo[0], s_hi[0] + 1))
        axis_map = _axis_map(sub_affine, box_affine)
        if axis_map is not None:  # axis-aligned grids (any permutation/flip): separable, fast
            values, valid = _resample_aligned(sub, axis_map, box_shape, nearest)
            out[box] = (values >= threshold) & valid
            return out
        # oblique grids: SimpleITK; outside the sub-array counts as below the threshold
        below = float(threshold) - 1.0 - abs(float(threshold))
        image = _sitk_image(sub, sub_affine)
        values = _resample(image, box_shape, box_affine, nearest, default=below)
        out[box] = values >= threshold
        return out


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
    return _sitk_image(box, affine)


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
    # axis-aligned sources (nearly all CTs): anti-aliased resampling in one separable pass whose
    # result is cut to the final grid below; oblique sources: SimpleITK in two steps
    fast = _smoothed_aligned(volume, full, _antialias_sigma_mm(volume, spec), air)
    if fast is not None:
        coarse = fast
    else:
        coarse = _resample(_sitk_image(volume.array, volume.ijk_to_ras), full.shape,
                           full.ijk_to_ras, nearest=False, default=air,
                           pixel_type=sitk.sitkFloat32)
    bbox = _largest_component_bbox(coarse > spec.body_threshold_hu)
    if fast is None:
        del coarse
    if bbox is None:
        name = f" {volume.source}" if volume.source else ""
        raise InputError(f"No body found in the volume{name}: no voxel is above {spec.body_threshold_hu:g} HU.")
    lo, hi = bbox
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
        hu = _resample(image, grid.shape, grid.ijk_to_ras, nearest=False, default=air,
                       pixel_type=sitk.sitkFloat32)
        hu[~_inside_hull(grid, volume)] = air  # ITK's half-open buffer test is not flip-symmetric
    np.clip(hu, spec.hu_min, spec.hu_max, out=hu)
    hu -= spec.hu_min
    hu *= 1.0 / (spec.hu_max - spec.hu_min)
    return ModelImage(hu.astype(np.float32, copy=False), grid, spec)


# --- fast path for axis-aligned grids ------------------------------------------------------------
# When every source voxel axis runs along one model-grid axis (RAS-aligned model grid, source
# with any axis permutation/flip and any spacing/origin), trilinear interpolation is the product
# of three 1D linear interpolations. Doing them one axis after the other with gathers costs a few
# memory passes instead of ITK's per-voxel transform, which keeps to_source(threshold=...) within
# its budget on 512x512x300 grids. Border rule as in ITK's interpolators: positions within half
# a voxel outside the outermost voxel centres take the edge value, farther ones are invalid.

def _axis_map(grid_ijk_to_ras: np.ndarray, box_ijk_to_ras: np.ndarray):
    """Per output (box) voxel axis a: (grid axis b, scale, offset) with
    grid_index_b = scale * box_index_a + offset, or None when the axes are not aligned."""
    m = np.linalg.inv(grid_ijk_to_ras) @ box_ijk_to_ras
    out = []
    for a in range(3):
        col = m[:3, a]
        b = int(np.argmax(np.abs(col)))
        # scanners write direction cosines like 1e-9 or 3e-7 off-axis; below 1e-6 (<= 1e-3 voxel
        # over a 1000-voxel axis) the grids are treated as aligned
        if np.any(np.abs(np.delete(col, b)) > 1e-6 * max(1.0, abs(col[b]))):
            return None
        out.append((b, float(col[b]), float(m[b, 3])))
    if len({b for b, _, _ in out}) != 3:
        return None
    return out


def _resample_aligned(array: np.ndarray, axis_map, out_shape, nearest: bool):
    """Resample ``array`` (on the grid) onto the box grid; returns (values, valid) where
    ``valid`` broadcasts to ``out_shape`` and is False outside the grid."""
    # array axis of the box for voxel axis a is 2 - a; same for the grid
    t = array.transpose([2 - axis_map[2 - ax][0] for ax in range(3)])
    valid = np.ones((1, 1, 1), dtype=bool)
    for ax in (2, 1, 0):
        _, scale, offset = axis_map[2 - ax]
        x = scale * np.arange(out_shape[ax], dtype=np.float64) + offset
        t, ok = _interp_axis(t, ax, x, nearest)
        shape = [1, 1, 1]
        shape[ax] = -1
        valid = valid & ok.reshape(shape)
    return t, valid


def _resample_aligned_full(array: np.ndarray, axis_map, out_shape, nearest: bool, fill,
                           slab: int = 16) -> np.ndarray:
    """Like ``_resample_aligned`` for a whole volume: the last (slowest) axis is done in slabs
    of ``slab`` output slices written straight into the result; outside the grid -> ``fill``."""
    t = array.transpose([2 - axis_map[2 - ax][0] for ax in range(3)])
    valid = np.ones((1, 1, 1), dtype=bool)
    for ax in (2, 1):
        _, scale, offset = axis_map[2 - ax]
        x = scale * np.arange(out_shape[ax], dtype=np.float64) + offset
        t, ok = _interp_axis(t, ax, x, nearest)
        shape = [1, 1, 1]
        shape[ax] = -1
        valid = valid & ok.reshape(shape)
    _, scale, offset = axis_map[2]
    x = scale * np.arange(out_shape[0], dtype=np.float64) + offset
    out = np.empty(tuple(out_shape), dtype=t.dtype)
    fill = np.asarray(fill).astype(t.dtype)
    for start in range(0, out_shape[0], slab):
        xs = x[start:start + slab]
        part, ok = _interp_axis(t, 0, xs, nearest)
        out[start:start + len(xs)] = np.where(valid & ok.reshape(-1, 1, 1), part, fill)
    return out


def _interp_axis(t: np.ndarray, axis: int, x: np.ndarray, nearest: bool):
    n = t.shape[axis]
    ok = (x >= -0.5) & (x <= n - 0.5)
    if nearest:
        idx = np.clip(np.floor(x + 0.5).astype(np.intp), 0, n - 1)
        return np.take(t, idx, axis=axis), ok
    xc = np.clip(x, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(xc).astype(np.intp), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1, 1, 1]
    shape[axis] = -1
    f = (xc - i0).astype(np.float32).reshape(shape)
    a0 = np.take(t, i0, axis=axis)
    a1 = np.take(t, i1, axis=axis)
    a1 -= a0          # a0 + f * (a1 - a0), in place to keep memory passes low
    a1 *= f
    a1 += a0
    return a1, ok


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
    amap = _axis_map(volume.ijk_to_ras, grid.ijk_to_ras)  # per grid axis: source axis, scale, off
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

"""The only mapping between a model grid and the source voxel grid (and the one SimpleITK
resampler): every backend's masks, logits and heat maps reach the user's voxels through here.

- :func:`grid_to_source` maps any array on a model grid (``ModelGrid``: ``shape`` [k,j,i] and
  ``ijk_to_ras``) onto a volume's grid: linear or nearest, optionally thresholded to uint8 with
  only the bounding box of the above-threshold region resampled.
- :func:`threshold_to_source` / :func:`interpolate_to_source`: faster separable paths for masks
  and heat maps (bounded memory on 512x512x300 grids); :class:`SourceMapper` applies them to
  mask logits.
- Axis-aligned grids (any permutation/flip/spacing/origin of RAS axes; off-axis direction terms
  below ``ALIGN_TOL``) take separable 1D interpolations; oblique grids go through SimpleITK.
  Border rule as ITK's: within half a voxel outside the outer voxel centres the edge value holds.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .volume import set_sitk_geometry, sitk_geometry

# scanners write direction cosines like 1e-9 or 3e-7 off-axis; below 1e-6 (<= 1e-3 voxel over a
# 1000-voxel axis) two grids are treated as axis-aligned
ALIGN_TOL = 1e-6


def sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 logistic function (overflow -> 0, intended)."""
    out = np.empty_like(x, dtype=np.float32)
    np.negative(x, out=out)
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def sitk_image(array: np.ndarray, ijk_to_ras: np.ndarray):
    import SimpleITK as sitk

    arr = np.ascontiguousarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    image = sitk.GetImageFromArray(arr)
    set_sitk_geometry(image, ijk_to_ras)
    return image


def sitk_resample(image, shape, ijk_to_ras, nearest: bool, default: float, pixel_type=None) -> np.ndarray:
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


def grid_to_source(array: np.ndarray, grid, volume, mode: str = "linear",
                   threshold: float | None = None, fill_value: float = 0.0) -> np.ndarray:
    """Map an array on ``grid`` (a ModelGrid: ``shape``, ``ijk_to_ras``) back onto ``volume``'s voxel grid.

    Without ``threshold`` returns the resampled array (float32 for linear mode, the input
    dtype for nearest mode); outside this grid the value is ``fill_value``.
    With ``threshold`` returns a uint8 mask (resampled value >= threshold); only the bounding
    box of the above-threshold region (plus interpolation support) is resampled.
    """
    array = np.asarray(array)
    if tuple(array.shape) != grid.shape:
        raise InputError(f"Array shape {array.shape} does not match the model grid shape {grid.shape}.")
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    nearest = mode == "nearest"
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not nearest and array.dtype != np.float32:
        array = array.astype(np.float32)

    if threshold is None:
        axis_map = aligned_axes(grid.ijk_to_ras, volume.ijk_to_ras)
        if axis_map is not None:  # aligned grids: separable, slab by slab (bounded memory)
            return _resample_aligned_full(array, axis_map, volume.shape, nearest, fill_value)
        image = sitk_image(array, grid.ijk_to_ras)
        # fill_value: what lies outside the model grid (e.g. a very negative logit)
        return sitk_resample(image, volume.shape, volume.ijk_to_ras, nearest, default=fill_value)

    out = np.zeros(volume.shape, dtype=np.uint8)
    above = np.argwhere(array >= threshold)
    if above.size == 0:
        return out
    # model-grid index box (array order k,j,i) of the above-threshold voxels, widened by one
    # voxel: outside it, interpolated values are below threshold (nearest: outside it,
    # the nearest voxel is below threshold too).
    lo = np.maximum(above.min(0) - 1, 0)
    hi = np.minimum(above.max(0) + 1, np.asarray(grid.shape) - 1)
    sub = array[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    sub_affine = grid.ijk_to_ras.copy()
    sub_affine[:3, 3] = grid.ijk_to_ras[:3, :3] @ lo[::-1] + grid.ijk_to_ras[:3, 3]
    # source index box covering that region (corners in (i,j,k) order)
    # half a grid voxel beyond the outer nodes: where the sub-array touches the grid border,
    # source voxels up to there still take the edge value (ITK's half-voxel rule)
    corners = np.array([[a, b, c] for a in (lo[2] - 0.5, hi[2] + 0.5) for b in (lo[1] - 0.5, hi[1] + 0.5)
                        for c in (lo[0] - 0.5, hi[0] + 0.5)], dtype=np.float64)
    ras = corners @ grid.ijk_to_ras[:3, :3].T + grid.ijk_to_ras[:3, 3]
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
    axis_map = aligned_axes(sub_affine, box_affine)
    if axis_map is not None:  # axis-aligned grids (any permutation/flip): separable, fast
        values, valid = _resample_aligned(sub, axis_map, box_shape, nearest)
        out[box] = (values >= threshold) & valid
        return out
    # oblique grids: SimpleITK; outside the sub-array counts as below the threshold
    below = float(threshold) - 1.0 - abs(float(threshold))
    image = sitk_image(sub, sub_affine)
    values = sitk_resample(image, box_shape, box_affine, nearest, default=below)
    out[box] = values >= threshold
    return out


# When every source voxel axis runs along one model-grid axis (RAS-aligned model grid, source
# with any axis permutation/flip and any spacing/origin), trilinear interpolation is the product
# of three 1D linear interpolations. Doing them one axis after the other with gathers costs a few
# memory passes instead of ITK's per-voxel transform, which keeps to_source(threshold=...) within
# its budget on 512x512x300 grids. Border rule as in ITK's interpolators: positions within half
# a voxel outside the outermost voxel centres take the edge value, farther ones are invalid.

def aligned_axes(grid_ijk_to_ras: np.ndarray, box_ijk_to_ras: np.ndarray):
    """Per output (box) voxel axis a: (grid axis b, scale, offset) with
    grid_index_b = scale * box_index_a + offset, or None when the axes are not aligned."""
    m = np.linalg.inv(grid_ijk_to_ras) @ box_ijk_to_ras
    out = []
    for a in range(3):
        col = m[:3, a]
        b = int(np.argmax(np.abs(col)))
        if np.any(np.abs(np.delete(col, b)) > ALIGN_TOL * max(1.0, abs(col[b]))):
            return None
        out.append((b, float(col[b]), float(m[b, 3])))
    if len({b for b, _, _ in out}) != 3:
        return None
    return out


def _interp_axes(array: np.ndarray, axis_map, out_shape, nearest: bool, axes):
    """Interpolate ``array`` (on the grid) along the given output array axes; returns
    (values, valid) where ``valid`` broadcasts to ``out_shape`` and is False outside the grid."""
    # array axis of the box for voxel axis a is 2 - a; same for the grid
    t = array.transpose([2 - axis_map[2 - ax][0] for ax in range(3)])
    valid = np.ones((1, 1, 1), dtype=bool)
    for ax in axes:
        _, scale, offset = axis_map[2 - ax]
        x = scale * np.arange(out_shape[ax], dtype=np.float64) + offset
        t, ok = _interp_axis(t, ax, x, nearest)
        shape = [1, 1, 1]
        shape[ax] = -1
        valid = valid & ok.reshape(shape)
    return t, valid


def _resample_aligned(array: np.ndarray, axis_map, out_shape, nearest: bool):
    """Resample ``array`` onto the box grid: (values, valid)."""
    return _interp_axes(array, axis_map, out_shape, nearest, (2, 1, 0))


def _resample_aligned_full(array: np.ndarray, axis_map, out_shape, nearest: bool, fill,
                           slab: int = 16) -> np.ndarray:
    """Like ``_resample_aligned`` for a whole volume: the last (slowest) axis is done in slabs
    of ``slab`` output slices written straight into the result; outside the grid -> ``fill``."""
    t, valid = _interp_axes(array, axis_map, out_shape, nearest, (2, 1))
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


def _axis_weights(x: np.ndarray, n: int):
    """Linear interpolation nodes/weights for positions x on an axis of n nodes (edge values
    within half a node outside, as ITK)."""
    xc = np.clip(x, 0.0, n - 1.0)
    i0 = np.floor(xc).astype(np.intp)
    if n > 1:
        i0 = np.minimum(i0, n - 2)
        i1 = i0 + 1
    else:
        i0 = np.zeros_like(i0)
        i1 = i0
    f = (xc - i0).astype(np.float32)
    return i0, i1, f


def threshold_to_source(array: np.ndarray, grid, volume, threshold: float) -> np.ndarray:
    """uint8 mask on ``volume``'s grid: (trilinear interpolation of ``array`` on ``grid``)
    >= ``threshold``, for axis-aligned grids (any permutation/flip/spacing/origin); otherwise
    ``grid.to_source(..., threshold=...)``.

    Separable, bounding-box limited and sparse along the source's slowest axis: between two
    grid planes, only the pixels where the two planes disagree about the threshold are
    interpolated; every other output slice is a copy. No full-resolution float array is made
    (the largest temporary is one in-plane float slice of the mask's bounding box)."""
    array = np.asarray(array, dtype=np.float32)
    axes = aligned_axes(grid.ijk_to_ras, volume.ijk_to_ras)
    shape = tuple(volume.shape)
    if axes is None or array.ndim != 3:
        return grid_to_source(array, grid, volume, mode="linear", threshold=threshold)
    thr = np.float32(threshold)
    out = np.zeros(shape, dtype=np.uint8)
    # grid array [k, j, i] -> G indexed like the source array [k, j, i]
    g = array.transpose([2 - axes[2][0], 2 - axes[1][0], 2 - axes[0][0]])
    above = g >= thr
    if not above.any():
        return out
    lo_hi = []
    for ax in range(3):  # G axis ax == source array axis ax
        other = tuple(a for a in range(3) if a != ax)
        hit = np.flatnonzero(above.any(axis=other))
        lo_hi.append((int(hit[0]), int(hit[-1])))
    sel = []   # per source array axis: (start, stop, i0, i1, f) over the selected source indices
    for ax in range(3):
        b, scale, offset = axes[2 - ax]
        n_src, n_grid = shape[ax], g.shape[ax]
        x = scale * np.arange(n_src, dtype=np.float64) + offset
        lo, hi = lo_hi[ax]
        keep = (x >= -0.5) & (x <= n_grid - 0.5) & (x > lo - 1.0) & (x < hi + 1.0)
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            return out
        start, stop = int(idx[0]), int(idx[-1]) + 1   # x is monotone in the source index
        i0, i1, f = _axis_weights(x[start:stop], n_grid)
        sel.append((start, stop, i0, i1, f))
    (ks, ke, k0, k1, kf), (js, je, j0, j1, jf), (is_, ie, i0, i1, if_) = sel
    # along i (fastest source axis) on the small grid array, only rows the k pass will use
    rows = np.union1d(k0, k1)
    r = g[rows]                                                      # [rk, gj, gi]
    r = r[:, :, i0] * (1.0 - if_) + r[:, :, i1] * if_                 # [rk, gj, ni] float32
    rb = r >= thr                                                    # its threshold decisions
    row_pos = {int(kg): n for n, kg in enumerate(rows)}
    ni = r.shape[2]
    jw0 = (1.0 - jf).astype(np.float32)

    def values(kg: int, idx: np.ndarray) -> np.ndarray:
        """Interpolated (along j) values of plane kg at flat in-plane indices idx."""
        rr = r[row_pos[kg]]
        yy, xx = np.divmod(idx, ni)
        return rr[j0[yy], xx] * jw0[yy] + rr[j1[yy], xx] * jf[yy]

    cache: dict = {}

    def plane(kg: int) -> np.ndarray:
        """Boolean plane kg on the source in-plane grid: rows copied from the grid rows' decisions,
        interpolated only where the two neighbouring grid rows disagree."""
        p = cache.get(kg)
        if p is None:
            rbb = rb[row_pos[kg]]
            p = rbb[j0]
            idx = np.flatnonzero(p != rbb[j1])
            if idx.size:
                p.ravel()[idx] = values(kg, idx) >= thr
            cache[kg] = p
        return p

    # output slices in order of their pair of grid planes; between two planes only the pixels
    # where the planes disagree need interpolation
    order = np.argsort(k0, kind="stable")
    target = out[ks:ke, js:je, is_:ie]
    prev = None
    for n in order:
        a, b_, f = int(k0[n]), int(k1[n]), float(kf[n])
        if prev != (a, b_):
            for kg in [k for k in cache if k not in (a, b_)]:
                del cache[kg]
            ba = plane(a)
            if b_ != a:
                diff = np.flatnonzero(ba != plane(b_))
                ta, tb = values(a, diff), values(b_, diff)
            else:
                diff = np.zeros(0, dtype=np.intp)
            prev = (a, b_)
        if diff.size and f > 0.0:
            buf = ba.copy()          # contiguous: ravel() is a view
            buf.ravel()[diff] = (ta * np.float32(1.0 - f) + tb * np.float32(f)) >= thr
            target[n] = buf
        else:                        # f == 0: exactly on plane a
            target[n] = ba
    return out


def interpolate_to_source(array: np.ndarray, grid, volume, fill: float = 0.0) -> np.ndarray:
    """float32 trilinear interpolation of ``array`` (on ``grid``) at every source voxel centre;
    ``fill`` outside the grid (beyond half a grid voxel). Separable and slice by slice for
    axis-aligned grids (the output is the only full-size array); otherwise ``grid.to_source``."""
    array = np.asarray(array, dtype=np.float32)
    axes = aligned_axes(grid.ijk_to_ras, volume.ijk_to_ras)
    shape = tuple(volume.shape)
    if axes is None:
        return grid_to_source(array, grid, volume, mode="linear", fill_value=fill).astype(np.float32, copy=False)
    fill32 = np.float32(fill)
    g = array.transpose([2 - axes[2][0], 2 - axes[1][0], 2 - axes[0][0]])
    per_axis = []
    for ax in range(3):
        _, scale, offset = axes[2 - ax]
        x = scale * np.arange(shape[ax], dtype=np.float64) + offset
        valid = (x >= -0.5) & (x <= g.shape[ax] - 0.5)
        per_axis.append((valid,) + _axis_weights(x, g.shape[ax]))
    (kv, k0, k1, kf), (jv, j0, j1, jf), (iv, i0, i1, if_) = per_axis
    r = g[:, :, i0] * (1.0 - if_) + g[:, :, i1] * if_                # [gk, gj, ni]
    r[:, :, ~iv] = fill32
    jw0, jw1 = (1.0 - jf)[:, None], jf[:, None]
    out = np.empty(shape, dtype=np.float32)
    cache: dict = {}

    def plane(kg: int) -> np.ndarray:
        p = cache.get(kg)
        if p is None:
            p = r[kg][j0] * jw0 + r[kg][j1] * jw1
            p[~jv] = fill32
            cache[kg] = p
        return p

    for n in np.argsort(k0, kind="stable"):
        if not kv[n]:
            out[n] = fill32
            continue
        a, b_, f = int(k0[n]), int(k1[n]), np.float32(kf[n])
        for kg in [k for k in cache if k not in (a, b_)]:
            del cache[kg]
        pa = plane(a)
        if f == 0.0 or a == b_:
            out[n] = pa
        else:
            np.multiply(pa, np.float32(1.0) - f, out=out[n])
            out[n] += plane(b_) * f
    return out


class SourceMapper:
    """Maps feature-grid mask logits to the source grid: masks as uint8 (only the bounding box of
    the mask is resampled), heat maps as float32 probabilities.

    ``interpolate="logit"`` (default) interpolates the logits linearly and thresholds at
    logit(threshold): smoother boundaries than interpolating probabilities, the same decision
    at the feature-grid voxel centres. ``"probability"`` interpolates sigmoid(logits)."""

    def __init__(self, interpolate: str = "logit", fast: bool = True):
        if interpolate not in ("logit", "probability"):
            raise ValueError("interpolate must be 'logit' or 'probability'")
        self.interpolate = interpolate
        self.fast = fast

    def mask(self, logit: np.ndarray, grid, volume, threshold: float) -> np.ndarray:
        """uint8 mask on ``volume``'s grid where the probability of ``logit`` (on ``grid``)
        reaches ``threshold``."""
        t = float(threshold)
        if self.interpolate == "logit":
            arr, thr = logit, math.log(t / (1.0 - t))
        else:
            arr, thr = sigmoid(logit), t
        if self.fast:
            return threshold_to_source(arr, grid, volume, thr)
        return grid_to_source(np.asarray(arr, dtype=np.float32), grid, volume, mode="linear",
                              threshold=thr)

    def probability(self, logit: np.ndarray, grid, volume) -> np.ndarray:
        """Heat map: sigmoid of the feature-grid logits, interpolated linearly (probabilities, not
        logits: no exponential per source voxel), 0 outside the model grid."""
        out = interpolate_to_source(sigmoid(logit), grid, volume, fill=0.0)
        return np.clip(out, 0.0, 1.0, out=out)

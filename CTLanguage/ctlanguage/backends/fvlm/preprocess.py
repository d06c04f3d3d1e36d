"""fVLM's preprocessing on our geometry.

fVLM's pipeline (facts from its published description and data scripts) reads CT-RATE NIfTI files
as stored (LPS files from axial DICOM: array [D, H, W] = slices toward superior, rows toward
posterior, columns toward the patient's left), merges TotalSegmentator's classes into four regions
(lung = the five lobes, heart = heart + left atrial appendage, esophagus, aorta), then:

1. resizes by voxel counts to ~1 x 1 x 3 mm: ``n_out = int(n_in * spacing / target)`` per axis,
   image trilinear (align_corners=False: sample ``o`` reads input position
   ``(o + 0.5) * n_in / n_out - 0.5``, clamped to the edge voxels), regions nearest with PyTorch's
   rule (input index ``floor(o * n_in / n_out)``, computed in float32);
2. maps HU [-1150, 350] -> [0, 1], clipped;
3. crops to the bounding box of all regions, widened by 5 slices and 20 rows/columns (the slice
   ends at ``max + margin``, exclusive), and zero-pads symmetrically to at least 112 x 256 x 352;
4. per region: a window of at least 112 x 288 x 352 (or the region's box extent, if larger)
   centred on the region's box, shifted inside the volume, holding only that region's mask;
   zero-padded at the end to multiples of the 16 x 16 x 32 patch.

Here step 0 is ours: any input orientation is first brought exactly (axis permutation/flip, no
interpolation) onto that stored layout, so every axis order of the same scan gives the same
network input; oblique scans are resampled onto it (``resample.sitk_resample``, the project's
one SimpleITK resampler). Every array keeps a :class:`~ctlanguage.preprocess.ModelGrid`, so its
voxels map back onto the source voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import InputError
from ...preprocess import ModelGrid
from ...resample import ALIGN_TOL, _interp_axis, sitk_image, sitk_resample
from ...volume import CTVolume
from .network import INPUT, ORGANS, PATCH

# RAS direction of the stored axes (i = W, j = H, k = D): patient left, posterior, superior
STORED_DIRECTION = np.array([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]]).T
TARGET_MM = (3.0, 1.0, 1.0)          # D, H, W
HU_MIN, HU_MAX = -1150.0, 350.0
MARGIN = (5, 20, 20)                 # D, H, W voxels around the union of the regions
WINDOW = (112, 288, 352)             # smallest per-region window (D, H, W)
# each region as vocabulary anatomy keys (TotalSegmentator classes through the vocabulary)
REGIONS = {
    "lung": ("lung_left", "lung_right"),              # the five lobes
    "heart": ("heart", "atrial_appendage_left"),
    "esophagus": ("esophagus",),
    "aorta": ("aorta",),
}
AIR_HU = -1024.0                     # outside an oblique scan


# ----------------------------------------------------------------------------- step 0: layout

@dataclass
class Stored:
    """A scan in fVLM's stored layout: ``array`` [D, H, W] and its grid; ``take(src)`` brings any
    array on the source grid into the same layout (exactly, or nearest for oblique scans)."""

    array: np.ndarray
    grid: ModelGrid
    take: object


def to_stored_layout(volume: CTVolume) -> Stored:
    d = volume.direction
    spacing = volume.spacing
    # source axis (i, j, k index) and sign for each stored axis W, H, D
    dots = STORED_DIRECTION.T @ d          # [stored axis, source axis]
    src_axis = np.argmax(np.abs(dots), axis=1)
    aligned = len(set(src_axis.tolist())) == 3 and all(
        abs(abs(dots[a, src_axis[a]]) - 1.0) <= ALIGN_TOL for a in range(3))
    if aligned:
        signs = np.sign(dots[np.arange(3), src_axis])
        # array axes are [k, j, i] = 2 - voxel axis; stored array [D, H, W] = stored axes 2, 1, 0
        order = [2 - int(src_axis[a]) for a in (2, 1, 0)]
        flips = [signs[a] < 0 for a in (2, 1, 0)]

        def take(src: np.ndarray) -> np.ndarray:
            out = np.transpose(src, order)
            for ax, f in enumerate(flips):
                if f:
                    out = np.flip(out, axis=ax)
            return np.ascontiguousarray(out)

        shape_ijk = np.array(volume.shape[::-1])
        corner = np.where(signs < 0, shape_ijk[src_axis] - 1, 0)  # source index along each stored axis
        start = np.zeros(3)
        for a in range(3):
            start[src_axis[a]] = corner[a]
        affine = np.eye(4)
        affine[:3, :3] = STORED_DIRECTION * spacing[src_axis]
        affine[:3, 3] = volume.ijk_to_ras_points(start[None])[0]
        grid = ModelGrid(tuple(volume.shape[2 - int(src_axis[a])] for a in (2, 1, 0)), affine)
        return Stored(take(volume.array), grid, take)
    # oblique: resample onto the stored-layout grid covering the scan, each axis at the spacing
    # of the source axis closest to it
    sp = spacing[src_axis] if len(set(src_axis.tolist())) == 3 else np.full(3, spacing.min())
    n = np.array(volume.shape[::-1]) - 1
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], float)
    pts = volume.ijk_to_ras_points(corners) @ STORED_DIRECTION   # coordinates along W, H, D
    lo, hi = pts.min(0), pts.max(0)
    size = np.floor((hi - lo) / sp + 1e-6).astype(int) + 1
    affine = np.eye(4)
    affine[:3, :3] = STORED_DIRECTION * sp
    affine[:3, 3] = STORED_DIRECTION @ lo
    grid = ModelGrid(tuple(int(v) for v in size[::-1]), affine)

    def take(src: np.ndarray) -> np.ndarray:
        return sitk_resample(sitk_image(np.asarray(src, np.uint8), volume.ijk_to_ras), grid.shape,
                             grid.ijk_to_ras, nearest=True, default=0)

    hu = sitk_resample(sitk_image(volume.array, volume.ijk_to_ras), grid.shape, grid.ijk_to_ras,
                       nearest=False, default=AIR_HU)
    return Stored(np.asarray(hu, np.float32), grid, take)


# ----------------------------------------------------------------------------- step 1: resize

def resized_shape(shape_dhw, spacing_dhw) -> tuple:
    out = tuple(int(n * (s / t)) for n, s, t in zip(shape_dhw, spacing_dhw, TARGET_MM))
    if min(out) < 1:
        raise InputError(f"the scan ({' x '.join(map(str, shape_dhw))} voxels) is too small for fVLM")
    return out


def resize_image(array: np.ndarray, out_shape) -> np.ndarray:
    """Trilinear resize by voxel counts (align_corners=False; edge voxels hold outside)."""
    t = np.asarray(array, np.float32)
    for ax, m in enumerate(out_shape):
        n = t.shape[ax]
        x = (np.arange(m, dtype=np.float64) + 0.5) * (n / m) - 0.5
        t, _ = _interp_axis(t, ax, x, nearest=False)
    return np.ascontiguousarray(t, dtype=np.float32)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch's 'nearest' source index for each output voxel (float32 arithmetic)."""
    if n_in == n_out:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def resize_labels(labels: np.ndarray, out_shape) -> np.ndarray:
    t = labels
    for ax, m in enumerate(out_shape):
        t = np.take(t, nearest_index(t.shape[ax], m), axis=ax)
    return np.ascontiguousarray(t)


def resized_grid(grid: ModelGrid, out_shape) -> ModelGrid:
    """Grid of the trilinear resize (voxel o sits at input position (o + 0.5) * n_in/n_out - 0.5).
    The nearest-resized regions are read on the same grid (fVLM's half-voxel quirk included)."""
    n = np.array(grid.shape[::-1], float)            # W, H, D
    m = np.array(out_shape[::-1], float)
    scale = n / m
    affine = grid.ijk_to_ras.copy()
    affine[:3, :3] = grid.ijk_to_ras[:3, :3] * scale
    affine[:3, 3] = grid.ijk_to_ras[:3, :3] @ (0.5 * scale - 0.5) + grid.ijk_to_ras[:3, 3]
    return ModelGrid(tuple(out_shape), affine)


def shifted(grid: ModelGrid, offset_dhw, shape) -> ModelGrid:
    """Sub-grid starting at voxel ``offset_dhw`` (negative: padding before)."""
    affine = grid.ijk_to_ras.copy()
    affine[:3, 3] = grid.ijk_to_ras[:3, :3] @ np.asarray(offset_dhw, float)[::-1] + grid.ijk_to_ras[:3, 3]
    return ModelGrid(tuple(int(v) for v in shape), affine)


# ----------------------------------------------------------------------------- steps 2-4

@dataclass
class FVLMInput:
    """The whole-scan array after steps 1-3: ``image`` [D, H, W] in [0, 1], ``labels`` (0 none,
    1 + index in ORGANS), on ``grid``."""

    image: np.ndarray
    labels: np.ndarray
    grid: ModelGrid

    def present(self) -> list:
        found = set(np.unique(self.labels).tolist())
        return [o for i, o in enumerate(ORGANS) if i + 1 in found]


@dataclass
class Window:
    organ: str
    image: np.ndarray      # [D, H, W], sides multiples of PATCH
    mask: np.ndarray       # bool, same shape: this region only
    grid: ModelGrid


def region_labels(masks: dict, shape) -> np.ndarray:
    """One label map (0, 1..4) from per-region boolean masks on one grid (later regions win)."""
    labels = np.zeros(shape, np.uint8)
    for i, organ in enumerate(ORGANS):
        m = masks.get(organ)
        if m is not None:
            labels[np.asarray(m, bool)] = i + 1
    return labels


def _pad_symmetric(a: np.ndarray, target) -> tuple:
    before = [max(t - n, 0) // 2 for n, t in zip(a.shape, target)]
    widths = [(b, max(t - n, 0) - b) for b, n, t in zip(before, a.shape, target)]
    return np.pad(a, widths), before


def prepare(volume: CTVolume, masks: dict, validate: bool = True) -> FVLMInput:
    """Steps 0-3 for ``volume`` and its region masks (``{organ: bool array on the source grid}``,
    keys from ORGANS; absent regions may be missing)."""
    if validate:
        volume.validate()
    for organ, m in masks.items():
        if organ not in ORGANS:
            raise InputError(f"fVLM has no region {organ!r}; it knows {', '.join(ORGANS)}")
        if np.shape(m) != volume.shape:
            raise InputError(f"the {organ} mask has shape {np.shape(m)}, the scan {volume.shape}")
    stored = to_stored_layout(volume)
    labels = stored.take(region_labels(masks, volume.shape)) if masks else None
    if labels is None or not labels.any():
        raise InputError("fVLM found none of its regions (lung, heart, esophagus, aorta) in the "
                         "anatomy masks of this scan")
    spacing = np.array(stored.grid.spacing)[::-1]           # D, H, W
    out = resized_shape(stored.array.shape, spacing)
    hu = resize_image(stored.array, out)
    labels = resize_labels(labels, out)
    grid = resized_grid(stored.grid, out)
    img = np.clip((hu - HU_MIN) / (HU_MAX - HU_MIN), 0.0, 1.0).astype(np.float32)
    idx = np.nonzero(labels)
    if not len(idx[0]):
        raise InputError("fVLM's regions vanish when the scan is resized to 1 x 1 x 3 mm")
    lo = [max(int(i.min()) - m, 0) for i, m in zip(idx, MARGIN)]
    hi = [min(int(i.max()) + m, n) for i, m, n in zip(idx, MARGIN, labels.shape)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    img, before = _pad_symmetric(img[sl], INPUT)
    labels, _ = _pad_symmetric(labels[sl], INPUT)
    origin = [a - b for a, b in zip(lo, before)]
    return FVLMInput(img, labels, shifted(grid, origin, img.shape))


def window(x: FVLMInput, organ: str) -> Window:
    """Step 4 for one region present in ``x``."""
    value = ORGANS.index(organ) + 1
    mask = x.labels == value
    idx = np.nonzero(mask)
    if not len(idx[0]):
        raise InputError(f"the {organ} region is absent from this scan")
    starts, sizes = [], []
    for ax in range(3):
        lo, hi, n = int(idx[ax].min()), int(idx[ax].max()), x.labels.shape[ax]
        size = max(WINDOW[ax], hi - lo)
        start = max(0, (lo + hi) // 2 - size // 2)
        end = min(n, start + size)
        if end - start < size:
            start = max(0, end - size)
        starts.append(start)
        sizes.append(end - start)
    sl = tuple(slice(s, s + n) for s, n in zip(starts, sizes))
    pad = [(0, -n % p) for n, p in zip(sizes, PATCH)]
    img = np.pad(x.image[sl], pad)
    m = np.pad(mask[sl], pad)
    return Window(organ, img, m, shifted(x.grid, starts, img.shape))

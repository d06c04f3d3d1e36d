"""Merlin's preprocessing on our geometry: RAS, 1.5 x 1.5 x 3 mm trilinear, HU [-1000, 1000] ->
[0, 1] (clipped), zero-pad then centre-crop to 224 x 224 x 160 voxels (R, A, S).

merlin-vlm does this with MONAI (Orientation "RAS", Spacing bilinear with border padding,
ScaleIntensityRange, SpatialPad symmetric, CenterSpatialCrop). Here the same grid is computed
from the volume's voxel->RAS matrix and sampled with :mod:`ctlanguage.resample`'s separable
interpolation, so any axis order/flip of the same scan lands on the same grid and the result is a
:class:`~ctlanguage.preprocess.ModelGrid` that maps back to the source voxels exactly.

The grid (MONAI's rule, checked against MONAI in Testing/test_merlin_preprocess.py): the RAS
bounding box of the source voxel centres starts at ``lo``; along each axis the resampled scan has
``n = round(extent / spacing + 1)`` samples (halves to even) ``lo + i * spacing``; padding/cropping to ``T`` then
starts the output at sample ``-((T - n) // 2)`` when ``n < T`` and at ``n // 2 - T // 2`` otherwise.
Samples past the source hull but inside the resampled extent take the edge value (border padding);
padded samples are 0.

For an oblique source MONAI keeps the scanner's tilt in its output grid; we resample onto the
RAS-aligned grid of the same extent instead (SimpleITK, trilinear), so the model always sees
R, A, S axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...preprocess import ModelGrid
from ...resample import _resample_aligned, aligned_axes, sitk_image, sitk_resample
from ...volume import CTVolume

SPACING_RAS = (1.5, 1.5, 3.0)
SHAPE_RAS = (224, 224, 160)
HU_MIN, HU_MAX = -1000.0, 1000.0


@dataclass
class MerlinInput:
    """``array``: float32 [S, A, R] in [0, 1] on ``grid`` (our [k, j, i] convention)."""

    array: np.ndarray
    grid: ModelGrid
    resampled_shape_ras: tuple   # samples per axis before padding/cropping (n above)

    def network_input(self):
        """(1, 1, R, A, S) tensor, the (B, 1, X, Y, Z) layout Merlin's encoder expects."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.array.transpose(2, 1, 0)))[None, None]


def merlin_grid(volume: CTVolume, shape_ras=SHAPE_RAS, spacing_ras=SPACING_RAS):
    """(output ModelGrid, samples per RAS axis of the resampled scan, index of the first output
    sample in that resampled scan per RAS axis)."""
    n_ijk = np.asarray(volume.shape[::-1]) - 1
    corners = np.array([[a, b, c] for a in (0, n_ijk[0]) for b in (0, n_ijk[1])
                        for c in (0, n_ijk[2])], dtype=np.float64)
    ras = volume.ijk_to_ras_points(corners)
    lo, hi = ras.min(0), ras.max(0)
    s = np.asarray(spacing_ras, dtype=np.float64)
    t = np.asarray(shape_ras, dtype=int)
    n = np.round((hi - lo) / s + 1.0).astype(int)   # numpy rounds halves to even, as MONAI
    start = np.where(n < t, -((t - n) // 2), n // 2 - t // 2)
    affine = np.diag([*s, 1.0])
    affine[:3, 3] = lo + start * s
    return ModelGrid(tuple(int(v) for v in t[::-1]), affine), tuple(int(v) for v in n), start


def to_merlin_input(volume: CTVolume, validate: bool = True, shape_ras=SHAPE_RAS) -> MerlinInput:
    """Merlin's network input for ``volume`` (``shape_ras`` other than 224 x 224 x 160 only for
    tests that need a cheap network pass)."""
    if validate:
        volume.validate()
    grid, n, start = merlin_grid(volume, shape_ras)
    # inside the resampled extent (samples 0..n-1 of the spacing grid) per output axis (R, A, S)
    inside = [((start[a] + np.arange(grid.shape[2 - a])) >= 0)
              & ((start[a] + np.arange(grid.shape[2 - a])) <= n[a] - 1) for a in range(3)]
    amap = aligned_axes(volume.ijk_to_ras, grid.ijk_to_ras)
    if amap is not None:
        # separable trilinear sampling; positions past the source hull take the edge value
        # (MONAI's border padding), so the validity mask is not used
        hu, _ = _resample_aligned(np.asarray(volume.array, dtype=np.float32), amap, grid.shape, nearest=False)
        hu = np.ascontiguousarray(hu, dtype=np.float32)
    else:
        import SimpleITK as sitk

        hu = sitk_resample(sitk_image(volume.array, volume.ijk_to_ras), grid.shape, grid.ijk_to_ras,
                           nearest=False, default=HU_MIN, pixel_type=sitk.sitkFloat32)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    hu -= HU_MIN
    hu *= 1.0 / (HU_MAX - HU_MIN)
    mask = inside[2][:, None, None] & inside[1][None, :, None] & inside[0][None, None, :]
    hu[~mask] = 0.0
    return MerlinInput(hu.astype(np.float32, copy=False), grid, n)


"""Merlin preprocessing on our geometry: every orientation lands on the same RAS grid, and each
output voxel holds the scan's value at that voxel's RAS position (exact for a linear HU field,
which trilinear interpolation reproduces). Parity with merlin's own MONAI pipeline is in
test_merlin_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from ctlanguage.backends.merlin.backend import feature_grid
from ctlanguage.backends.merlin.preprocess import SHAPE_RAS, merlin_grid, to_merlin_input
from ctlanguage.volume import CTVolume

COEF = np.array([2.0, -1.5, 1.0])  # HU per mm along R, A, S
OFFSET = -200.0


def field(ras):
    return ras @ COEF + OFFSET


def volume(shape_ijk, affine) -> CTVolume:
    """Linear HU field sampled on the grid (array [k, j, i]), with one air voxel for validate()."""
    affine = np.asarray(affine, float)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape_ijk], indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    arr = field(ras).reshape(shape_ijk).transpose(2, 1, 0).astype(np.float32)
    return CTVolume(arr, affine)


BASE = np.array([[0.8, 0, 0, -40.0], [0, 0.9, 0, -30.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]])
SHAPE = (100, 80, 40)  # i, j, k


def reoriented(perm, flips):
    """The BASE scan stored with its voxel axes permuted (new axis a = old axis perm[a]) and
    flipped: the same voxels at the same RAS positions."""
    v = volume(SHAPE, BASE)
    arr_ijk = v.array.transpose(2, 1, 0)                 # [i, j, k]
    affine = BASE.copy()
    for a in range(3):
        if flips[a]:
            arr_ijk = np.flip(arr_ijk, a)
            affine[:3, 3] = affine[:3, 3] + affine[:3, a] * (SHAPE[a] - 1)
            affine[:3, a] = -affine[:3, a]
    arr_ijk = arr_ijk.transpose(perm)
    new = np.eye(4)
    new[:3, :3] = affine[:3, :3][:, list(perm)]
    new[:3, 3] = affine[:3, 3]
    return CTVolume(np.ascontiguousarray(arr_ijk.transpose(2, 1, 0)), new)


def _check_values(out, lo, hi, n):
    """Voxels inside the resampled extent hold the windowed field at their RAS centre, clamped
    to the scan's hull [lo, hi] (border padding, as MONAI's Spacing); padding is 0."""
    g = out.grid
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in g.shape[::-1]], indexing="ij"), -1).reshape(-1, 3)
    ras = idx @ g.ijk_to_ras[:3, :3].T + g.ijk_to_ras[:3, 3]
    expected = (np.clip(field(np.clip(ras, lo, hi)), -1000, 1000) + 1000) / 2000
    pos = (ras - lo) / np.array([1.5, 1.5, 3.0])   # sample index of the resampled scan
    inside = np.all((pos > -1e-6) & (pos < np.asarray(n) - 1 + 1e-6), axis=1)
    got = out.array.transpose(2, 1, 0).reshape(-1)
    assert inside.sum() > 1000 and (~inside).sum() > 1000
    np.testing.assert_allclose(got[inside], expected[inside], atol=2e-5)
    assert np.all(got[~inside] == 0.0)


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (0, 0, 0)), ((2, 0, 1), (1, 0, 1)),
                                         ((1, 2, 0), (1, 1, 0)), ((0, 2, 1), (0, 1, 1))])
def test_any_axis_order_and_flip_gives_the_same_ras_grid_and_values(perm, flips):
    ref = to_merlin_input(volume(SHAPE, BASE), validate=False)
    out = to_merlin_input(reoriented(perm, flips), validate=False)
    assert out.grid == ref.grid and out.resampled_shape_ras == ref.resampled_shape_ras
    assert out.array.shape == SHAPE_RAS[::-1] == (160, 224, 224)
    np.testing.assert_allclose(out.array, ref.array, atol=2e-6)
    np.testing.assert_allclose(out.grid.ijk_to_ras[:3, :3], np.diag([1.5, 1.5, 3.0]))
    hi = BASE[:3, 3] + np.diag(BASE)[:3] * (np.array(SHAPE) - 1)
    _check_values(out, BASE[:3, 3], hi, out.resampled_shape_ras)


def test_anisotropic_resampling_of_the_same_extent_lands_on_the_same_grid():
    coarse = volume((50, 40, 40), [[1.6, 0, 0, -40.0], [0, 1.8, 0, -30.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]])
    fine = volume((99, 79, 98), [[0.8, 0, 0, -40.0], [0, 0.9, 0, -30.0],
                                 [0, 0, 1.0051546391752577, -50.0], [0, 0, 0, 1]])
    a, b = to_merlin_input(coarse, validate=False), to_merlin_input(fine, validate=False)
    assert a.grid == b.grid
    np.testing.assert_allclose(a.array, b.array, atol=2e-5)


def test_large_scan_is_centre_cropped_and_small_scan_centred_in_padding():
    big = volume((300, 300, 20), np.diag([1.2, 1.2, 5.0, 1.0]))
    grid, n, start = merlin_grid(big)
    assert n == (240, 240, 33) and tuple(start) == (240 // 2 - 112, 240 // 2 - 112, -((160 - 33) // 2))
    out = to_merlin_input(big, validate=False)
    _check_values(out, np.zeros(3), np.array([299 * 1.2, 299 * 1.2, 19 * 5.0]), n)


def test_oblique_scan_is_resampled_onto_a_ras_aligned_grid():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.0, 1.0, 3.0])
    aff[:3, 3] = [-30, -20, -40]
    out = to_merlin_input(volume((60, 60, 30), aff), validate=False)
    np.testing.assert_allclose(out.grid.ijk_to_ras[:3, :3], np.diag([1.5, 1.5, 3.0]))
    # inside the rotated scan's hull the values follow the field exactly
    g = out.grid
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in g.shape[::-1]], indexing="ij"), -1).reshape(-1, 3)
    ras = idx @ g.ijk_to_ras[:3, :3].T + g.ijk_to_ras[:3, 3]
    src = (ras - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    inside = np.all((src > 0.01) & (src < np.array([59, 59, 29]) - 0.01), axis=1)
    got = out.array.transpose(2, 1, 0).reshape(-1)
    np.testing.assert_allclose(got[inside], ((np.clip(field(ras), -1000, 1000) + 1000) / 2000)[inside], atol=2e-5)


def test_feature_grid_centres_each_feature_voxel_on_its_input_block():
    out = to_merlin_input(volume(SHAPE, BASE), validate=False)
    fg = feature_grid(out.grid, (10, 7, 7))
    assert fg.shape == (10, 7, 7)
    np.testing.assert_allclose(np.diag(fg.ijk_to_ras)[:3], [48.0, 48.0, 48.0])
    # feature voxel (0,0,0) sits at the mean of input voxels 0..31 (R, A) and 0..15 (S)
    np.testing.assert_allclose(fg.ijk_to_ras[:3, 3],
                               out.grid.ijk_to_ras[:3, 3] + np.array([15.5 * 1.5, 15.5 * 1.5, 7.5 * 3.0]))

"""The separable fast paths of preprocess agree with SimpleITK resampling.

``to_model_space`` and ``ModelGrid.to_source(threshold=...)`` take a separable route when the
source voxel axes are aligned with the RAS model grid. These tests compare that route with an
independent SimpleITK reference on the same inputs (axis permutations/flips, anisotropic
spacing, non-zero origins, logit thresholds <= 0, oblique fallbacks)."""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

import ctlanguage.preprocess as pp
from ctlanguage.preprocess import ModelSpec, to_model_space
from ctlanguage.resample import aligned_axes
from ctlanguage.volume import CTVolume, set_sitk_geometry


def reorient(vol: CTVolume, perm, flips) -> CTVolume:
    """Same physical image; new voxel axis q = old axis perm[q], then flips per new axis."""
    a = vol.array.transpose(2, 1, 0).transpose(perm)           # [i, j, k] order
    aff = np.eye(4)
    aff[:3, :3] = vol.ijk_to_ras[:3, :3][:, list(perm)]
    aff[:3, 3] = vol.ijk_to_ras[:3, 3]
    for ax in range(3):
        if flips[ax]:
            a = np.flip(a, ax)
            aff[:3, 3] += aff[:3, ax] * (a.shape[ax] - 1)
            aff[:3, ax] *= -1
    return CTVolume(np.ascontiguousarray(a.transpose(2, 1, 0)), aff)


def torso(shape=(28, 44, 40), spacing=(1.3, 1.6, 2.5), origin=(-31.7, 12.2, 87.0), seed=3):
    k, j, i = np.indices(shape, dtype=np.float64)
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = origin
    ras = np.stack([i, j, k], -1) @ aff[:3, :3].T + aff[:3, 3]
    c = ras.reshape(-1, 3).mean(0)
    q = (((ras - c) / [25.0, 28.0, 30.0]) ** 2).sum(-1)
    rng = np.random.default_rng(seed)
    arr = np.where(q < 1, 40.0 + 60 * np.sin(ras[..., 0] / 5.0), -1000.0)
    arr += rng.normal(0, 20, shape)
    return CTVolume(arr.astype(np.float32), aff)


def itk_reference_mask(grid, array, vol, threshold, nearest=False):
    """Full-volume SimpleITK resampling, thresholded; outside the model grid counts as below."""
    img = sitk.GetImageFromArray(np.asarray(array, np.float32))
    set_sitk_geometry(img, grid.ijk_to_ras)
    ref = vol.to_sitk(np.zeros(vol.shape, np.float32))
    below = float(threshold) - 1.0 - abs(float(threshold))
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), interp, below))
    return (out >= threshold).astype(np.uint8)


ORIENTATIONS = list(itertools.product(itertools.permutations(range(3)),
                                      itertools.product((0, 1), repeat=3)))


@pytest.mark.parametrize("perm,flips", ORIENTATIONS[::5])
@pytest.mark.parametrize("nearest", [False, True])
def test_thresholded_to_source_matches_sitk(perm, flips, nearest):
    vol = reorient(torso(), perm, flips)
    grid = to_model_space(vol, ModelSpec(spacing_mm=3.0)).grid
    rng = np.random.default_rng(7)
    prob = np.zeros(grid.shape, np.float32)
    prob[8:20, 6:18, 5:17] = rng.random((12, 12, 12))
    logits = np.log(prob + 1e-3) - np.log(0.5)           # threshold 0 <=> p 0.5, negative outside
    for arr, thr in ((prob, 0.5), (logits, 0.0)):
        mode = "nearest" if nearest else "linear"
        got = grid.to_source(arr, vol, mode=mode, threshold=thr)
        want = itk_reference_mask(grid, arr, vol, thr, nearest)
        assert got.dtype == np.uint8 and got.shape == vol.shape
        assert got.sum() > 50
        # identical up to voxels whose interpolated value ties the threshold within float error
        assert np.count_nonzero(got != want) <= 2, np.count_nonzero(got != want)


def test_thresholded_to_source_on_scaled_grid_and_edges():
    vol = torso()
    grid = to_model_space(vol).grid
    feat = grid.scaled(2)
    arr = np.zeros(feat.shape, np.float32)
    arr[0:3, :, :] = 1.0        # touches the grid border: the half-voxel edge rule matters
    arr[-1, -2:, -2:] = 1.0
    got = feat.to_source(arr, vol, threshold=0.5)
    want = itk_reference_mask(feat, arr, vol, 0.5)
    assert got.sum() > 0
    assert np.count_nonzero(got != want) <= 2


@pytest.mark.parametrize("nearest", [False, True])
def test_thresholded_to_source_keeps_the_half_voxel_beyond_a_grid_inside_the_source(nearest):
    """A (cropped) grid that lies inside a finer source: source voxels within half a grid voxel
    outside its outer nodes take the edge value, on every side, as in ITK."""
    arr3 = np.full((50, 50, 50), -1000.0, np.float32)
    aff = np.diag([-1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [24.3, -24.3, -23.7]  # no source voxel centre exactly on a half-voxel boundary
    vol = CTVolume(arr3, aff)
    g = np.diag([5.0, 5.0, 5.0, 1.0])
    g[:3, 3] = [-12.5, -12.5, -12.5]
    grid = pp.ModelGrid((6, 6, 6), g)
    arr = np.ones(grid.shape, np.float32)
    got = grid.to_source(arr, vol, mode="nearest" if nearest else "linear", threshold=0.5)
    want = itk_reference_mask(grid, arr, vol, 0.5, nearest)
    assert want.sum() == 30 ** 3  # 6 nodes x 5 mm = 30 mm = 30 source voxels per axis
    assert np.count_nonzero(got != want) == 0


def test_oblique_source_uses_fallback_and_matches_sitk():
    vol = torso()
    t = np.radians(17.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    aff = vol.ijk_to_ras.copy()
    aff[:3, :3] = rot @ aff[:3, :3]
    vol = CTVolume(vol.array, aff)
    grid = to_model_space(vol).grid
    assert aligned_axes(grid.ijk_to_ras, vol.ijk_to_ras) is None
    logits = np.full(grid.shape, -4.0, np.float32)
    logits[6:14, 8:16, 8:16] = 3.0
    got = grid.to_source(logits, vol, threshold=0.0)
    want = itk_reference_mask(grid, logits, vol, 0.0)
    assert got.sum() > 0 and np.count_nonzero(got != want) <= 2


@pytest.mark.parametrize("spacing", [(0.7, 0.7, 5.0), (1.3, 1.6, 2.5), (4.0, 3.5, 0.9)])
def test_fast_model_space_matches_itk_path(spacing, monkeypatch):
    vol = torso(shape=(30, 40, 36) if spacing[2] < 4 else (12, 60, 70), spacing=spacing)
    fast = to_model_space(vol)
    monkeypatch.setattr(pp, "_smoothed_aligned", lambda *a, **k: None)  # force SimpleITK
    slow = to_model_space(vol)
    assert fast.grid.shape == slow.grid.shape
    assert np.allclose(fast.grid.ijk_to_ras, slow.grid.ijk_to_ras, atol=1e-9)
    diff = np.abs(fast.array - slow.array)
    # same discrete Gaussian + linear interpolation, computed in a different order
    assert diff.max() < 1e-4, diff.max()


def test_fast_model_space_is_orientation_invariant():
    vol = torso(spacing=(0.8, 0.8, 2.0))
    ref = to_model_space(vol)
    for perm, flips in ORIENTATIONS[1::3]:
        other = to_model_space(reorient(vol, perm, flips))
        assert other.grid == ref.grid
        assert np.abs(other.array - ref.array).max() < 1e-5


def test_model_grid_equality():
    g = to_model_space(torso()).grid
    same = pp.ModelGrid.from_dict(g.to_dict())
    assert g == same and not (g != same)
    shifted = g.ijk_to_ras.copy()
    shifted[0, 3] += 0.5
    assert g != pp.ModelGrid(g.shape, shifted) and g != g.scaled(2) and g != "grid"


@pytest.mark.parametrize("perm,flips", ORIENTATIONS[2::9])
def test_unthresholded_to_source_matches_sitk(perm, flips):
    vol = reorient(torso(shape=(40, 64, 70)), perm, flips)  # air around the body: grid < volume
    grid = to_model_space(vol).grid
    feat = grid.scaled(2)
    rng = np.random.default_rng(11)
    heat = rng.random(feat.shape).astype(np.float32)
    labels = rng.integers(0, 5, grid.shape).astype(np.uint8)
    for g, arr, mode, fill in ((feat, heat, "linear", -7.5), (grid, labels, "nearest", 0)):
        got = g.to_source(arr, vol, mode=mode, fill_value=fill)
        img = sitk.GetImageFromArray(arr)
        set_sitk_geometry(img, g.ijk_to_ras)
        interp = sitk.sitkLinear if mode == "linear" else sitk.sitkNearestNeighbor
        want = sitk.GetArrayFromImage(sitk.Resample(img, vol.to_sitk(np.zeros(vol.shape, np.float32)),
                                                    sitk.Transform(), interp, float(fill)))
        assert got.shape == vol.shape and got.dtype == arr.dtype
        assert np.any(got == fill) and np.any(got != fill)
        if mode == "linear":
            assert np.abs(got - want).max() < 1e-5
        else:  # nearest: voxel centres exactly between two grid voxels (ties) may round apart
            k, j, i = np.indices(vol.shape)
            ras = vol.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3))
            inv = np.linalg.inv(g.ijk_to_ras)
            x = ras @ inv[:3, :3].T + inv[:3, 3]
            tie = (np.abs(x % 1 - 0.5) < 1e-6).any(1).reshape(vol.shape)
            assert tie.mean() < 0.2
            assert np.array_equal(got[~tie], want[~tie])


def test_nearly_aligned_scanner_directions_take_the_fast_path():
    """Direction cosines a few 1e-8 off-axis (as scanners write them) are treated as aligned."""
    vol = torso()
    t = 3e-8
    rot = np.array([[1.0, -t, 0], [t, 1.0, 0], [0, 0, 1.0]])
    aff = vol.ijk_to_ras.copy()
    aff[:3, :3] = rot @ aff[:3, :3]
    tilted = CTVolume(vol.array, aff)
    mi = to_model_space(tilted)
    assert aligned_axes(mi.grid.ijk_to_ras, tilted.ijk_to_ras) is not None
    assert np.abs(mi.array - to_model_space(vol).array).max() < 1e-5
    arr = np.zeros(mi.grid.shape, np.float32)
    arr[5:15, 6:12, 7:17] = 1.0
    got = mi.grid.to_source(arr, tilted, threshold=0.5)
    assert np.count_nonzero(got != itk_reference_mask(mi.grid, arr, tilted, 0.5)) <= 2

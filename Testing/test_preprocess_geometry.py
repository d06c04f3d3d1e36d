"""Geometry of preprocessing: orientation invariance, exact inverse, crop, scaled grids."""

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctlanguage.errors import InputError
from ctlanguage.preprocess import ModelGrid, ModelSpec, to_model_space
from ctlanguage.volume import CTVolume

ORIENTATIONS = [(p, f) for p in itertools.permutations(range(3)) for f in itertools.product((0, 1), repeat=3)]


def rotation_z(deg):
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def make_affine(spacing, origin, rot=np.eye(3)):
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def voxel_ras(shape, affine):
    """RAS coordinates [k, j, i, 3] of all voxel centres."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return np.stack([i, j, k], -1) @ affine[:3, :3].T + affine[:3, 3]


def phantom(shape, affine, radii=(60, 45, 70), seed=0):
    """Ellipsoid 'body' (soft tissue with a smooth texture and a dense 'spine') in air."""
    ras = voxel_ras(shape, affine)
    centre = ras.reshape(-1, 3).mean(0)
    q = (((ras - centre) / radii) ** 2).sum(-1)
    tex = 80 * np.sin(ras[..., 0] / 9.0 + seed) * np.cos(ras[..., 1] / 7.0) + 30 * np.sin(ras[..., 2] / 11.0)
    arr = np.where(q < 1, 40 + tex, -1000.0)
    spine = np.linalg.norm((ras - centre - [0, -20, 0])[..., :2], axis=-1) < 10
    arr[spine & (q < 1)] = 700
    return arr.astype(np.float32), centre


def reorient(array, affine, perm, flips):
    """Same physical image with voxel axes permuted/flipped (new ijk axis q = old axis perm[q])."""
    a, aff = array, affine.copy()
    for ax in range(3):
        if flips[ax]:
            n = array.shape[2 - ax]
            a = np.flip(a, axis=2 - ax)
            aff[:3, 3] = aff[:3, 3] + aff[:3, ax] * (n - 1)
            aff[:3, ax] = -aff[:3, ax]
    a = np.transpose(a, [2 - perm[2 - p] for p in range(3)])
    out = np.eye(4)
    out[:3, 3] = aff[:3, 3]
    for q in range(3):
        out[:3, q] = aff[:3, perm[q]]
    return np.ascontiguousarray(a), out


def model_points(grid):
    return voxel_ras(grid.shape, grid.ijk_to_ras)


def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# --- orientation invariance ------------------------------------------------------------------------

def test_all_48_orientations_give_the_same_model_array():
    shape = (26, 34, 30)
    aff = make_affine((4.0, 3.5, 5.0), (-37.2, 15.9, 102.4))
    arr, _ = phantom(shape, aff)
    ref = to_model_space(CTVolume(arr, aff))
    assert ref.array.dtype == np.float32 and all(s % 16 == 0 for s in ref.array.shape)
    for perm, flips in ORIENTATIONS:
        a, af = reorient(arr, aff, perm, flips)
        out = to_model_space(CTVolume(a, af))
        assert out.array.shape == ref.array.shape, (perm, flips)
        np.testing.assert_allclose(out.grid.ijk_to_ras, ref.grid.ijk_to_ras, atol=1e-6)
        np.testing.assert_allclose(out.array, ref.array, atol=1e-5, err_msg=str((perm, flips)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    orientation=st.sampled_from(ORIENTATIONS),
    spacing=st.tuples(*[st.sampled_from([0.9, 1.7, 2.5, 3.0, 5.0])] * 3),
    origin=st.tuples(*[st.floats(-300, 300, allow_nan=False)] * 3),
    seed=st.integers(0, 5),
)
def test_orientation_invariance_property(orientation, spacing, origin, seed):
    # a fixed physical field of view sampled at the drawn spacing
    shape = tuple(int(round(96 / s)) for s in spacing[::-1])
    aff = make_affine(spacing, origin)
    arr, _ = phantom(shape, aff, radii=(36, 30, 40), seed=seed)
    ref = to_model_space(CTVolume(arr, aff))
    a, af = reorient(arr, aff, *orientation)
    out = to_model_space(CTVolume(a, af))
    assert out.array.shape == ref.array.shape
    np.testing.assert_allclose(out.grid.ijk_to_ras, ref.grid.ijk_to_ras, atol=1e-6)
    np.testing.assert_allclose(out.array, ref.array, atol=1e-4)


# --- model space -> source -------------------------------------------------------------------------

@pytest.mark.parametrize("rot_deg", [0.0, 27.0])
def test_model_mask_maps_back_onto_the_same_physical_voxels(rot_deg):
    # anisotropic 0.7 x 0.7 x 5 mm, non-zero origin, optionally oblique in-plane
    shape = (44, 200, 190)
    aff = make_affine((0.7, 0.7, 5.0), (-61.3, 44.8, -517.0), rotation_z(rot_deg))
    arr, centre = phantom(shape, aff, radii=(55, 50, 95))
    vol = CTVolume(arr, aff)
    mi = to_model_space(vol)
    sphere_c, r = centre + [8.0, -11.0, 20.0], 18.0
    prob = (np.linalg.norm(model_points(mi.grid) - sphere_c, axis=-1) < r).astype(np.float32)
    back = mi.grid.to_source(prob, vol, threshold=0.5)
    assert back.dtype == np.uint8 and back.shape == vol.shape
    ras = voxel_ras(shape, aff)
    truth = np.linalg.norm(ras - sphere_c, axis=-1) < r
    assert dice(back, truth) >= 0.9
    shift = ras[back.astype(bool)].mean(0) - ras[truth].mean(0)
    half_voxel_ras = np.abs(aff[:3, :3]) @ [0.5, 0.5, 0.5]  # half a source voxel along R, A, S
    assert np.all(np.abs(shift) <= half_voxel_ras), (shift, half_voxel_ras)


@pytest.mark.parametrize("lps_like, rot_deg", [(True, 0.0), (False, 0.0), (False, -15.0)])
def test_thresholded_fast_path_equals_full_resampling(lps_like, rot_deg):
    shape = (30, 90, 80)
    aff = make_affine((1.1, 1.3, 3.3), (10.0, -20.0, 30.0), rotation_z(rot_deg))
    if lps_like:  # the usual DICOM-derived grid: i towards L, j towards P
        aff[:3, :2] *= -1
    arr, _ = phantom(shape, aff, radii=(40, 45, 45))
    vol = CTVolume(arr, aff)
    grid = to_model_space(vol).grid
    rng = np.random.default_rng(1)
    prob = rng.random(grid.shape).astype(np.float32) ** 6  # sparse blobs above threshold
    for mode in ("linear", "nearest"):
        full = grid.to_source(prob, vol, mode=mode)
        fast = grid.to_source(prob, vol, mode=mode, threshold=0.5)
        np.testing.assert_array_equal(fast, (full >= 0.5).astype(np.uint8))
    assert grid.to_source(np.zeros(grid.shape, np.float32), vol, threshold=0.5).sum() == 0


@pytest.mark.parametrize("lps_like, rot_deg", [(True, 0.0), (False, 31.0)])
def test_to_source_matches_independent_trilinear_interpolation(lps_like, rot_deg):
    from scipy.ndimage import map_coordinates

    shape = (18, 60, 56)
    aff = make_affine((1.3, 1.1, 3.7), (-20.0, 35.0, 12.0), rotation_z(rot_deg))
    if lps_like:
        aff[:3, :2] *= -1
    vol = CTVolume(phantom(shape, aff, radii=(30, 30, 30))[0], aff)
    grid = to_model_space(vol).grid
    field = np.random.default_rng(2).random(grid.shape).astype(np.float32)
    got = grid.to_source(field, vol)
    # continuous model-grid index (i, j, k) of every source voxel centre
    ijk = (voxel_ras(shape, aff) - grid.ijk_to_ras[:3, 3]) @ np.linalg.inv(grid.ijk_to_ras[:3, :3]).T
    coords = ijk[..., ::-1].reshape(-1, 3).T  # array order (k, j, i)
    inside = np.all((coords >= 0) & (coords <= np.array(grid.shape)[:, None] - 1), axis=0)
    ref = map_coordinates(field, coords[:, inside], order=1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(got.reshape(-1)[inside], ref, atol=1e-4)


@pytest.mark.parametrize("lps_like, rot_deg", [(True, 0.0), (False, 23.0)])
def test_model_values_match_independent_trilinear_sampling(lps_like, rot_deg):
    from scipy.ndimage import map_coordinates

    shape = (20, 64, 60)
    aff = make_affine((1.2, 1.0, 3.5), (40.0, -15.0, 70.0), rotation_z(rot_deg))
    if lps_like:
        aff[:3, :2] *= -1
    arr, _ = phantom(shape, aff, radii=(30, 28, 32))
    spec = ModelSpec(antialias=False)
    mi = to_model_space(CTVolume(arr, aff), spec)
    ijk = (model_points(mi.grid) - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    coords = ijk[..., ::-1].reshape(-1, 3).T
    inside = np.all((coords >= 0) & (coords <= np.array(shape)[:, None] - 1), axis=0)
    hu = map_coordinates(arr, coords[:, inside], order=1)
    expected = (np.clip(hu, spec.hu_min, spec.hu_max) - spec.hu_min) / (spec.hu_max - spec.hu_min)
    assert inside.sum() > 1000
    np.testing.assert_allclose(mi.array.reshape(-1)[inside], expected, atol=1e-4)
    assert np.all(mi.array.reshape(-1)[~inside] == 0.0), "outside the source voxel centres is air"


def test_labels_round_trip_source_model_source():
    shape = (40, 110, 100)
    aff = make_affine((0.8, 0.9, 2.5), (100.0, -250.0, 40.0))
    arr, centre = phantom(shape, aff, radii=(35, 40, 45))
    vol = CTVolume(arr, aff)
    ras = voxel_ras(shape, aff)
    labels = np.zeros(shape, np.uint8)
    labels[np.linalg.norm(ras - centre - [-12, 0, 5], axis=-1) < 14] = 1
    labels[(np.abs(ras - centre - [14, 6, -20]) < [8, 10, 12]).all(-1)] = 2
    grid = to_model_space(vol).grid
    model_labels = grid.labels_to_model(labels, vol)
    assert model_labels.dtype == np.uint8 and model_labels.shape == grid.shape
    back = grid.to_source(model_labels, vol, mode="nearest")
    for lab in (1, 2):
        assert dice(back == lab, labels == lab) >= 0.85, lab
        shift = ras[back == lab].mean(0) - ras[labels == lab].mean(0)
        assert np.linalg.norm(shift) < 1.5, (lab, shift)


def test_scaled_grid_has_exact_voxel_centres():
    shape = (20, 60, 60)
    aff = make_affine((1.5, 1.5, 4.0), (3.0, 7.0, -11.0))
    vol = CTVolume(phantom(shape, aff, radii=(30, 30, 30))[0], aff)
    grid = to_model_space(vol).grid
    pts = model_points(grid)
    d, h, w = grid.shape
    for factor in (2, 4):
        # average-pooling a linear field must give the field at the scaled grid's voxel centres
        pooled = pts.reshape(d // factor, factor, h // factor, factor, w // factor, factor, 3).mean((1, 3, 5))
        sg = grid.scaled(factor)
        assert sg.shape == (d // factor, h // factor, w // factor)
        np.testing.assert_allclose(model_points(sg), pooled, atol=1e-9)
    with pytest.raises(ValueError):
        ModelGrid((17, 16, 16), grid.ijk_to_ras).scaled(2)


def test_feature_map_to_source_matches_physical_function():
    shape = (24, 70, 64)
    aff = make_affine((1.2, 1.1, 3.0), (-5.0, 12.0, 60.0), rotation_z(10))
    vol = CTVolume(phantom(shape, aff, radii=(30, 30, 30))[0], aff)
    fgrid = to_model_space(vol).grid.scaled(2)
    # linear field S + 2A on the feature grid; trilinear resampling reproduces it exactly inside
    pts = model_points(fgrid)
    field = (pts[..., 2] + 2 * pts[..., 1]).astype(np.float32)
    back = fgrid.to_source(field, vol)
    ras = voxel_ras(shape, aff)
    expected = ras[..., 2] + 2 * ras[..., 1]
    np.testing.assert_allclose(back, expected, atol=1e-2)


# --- crop, window, spec ------------------------------------------------------------------------------

def test_body_crop_margin_window_and_padding():
    shape = (60, 100, 100)
    aff = make_affine((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    ras = voxel_ras(shape, aff)
    arr = np.full(shape, -1000.0, np.float32)
    body = (np.abs(ras - [100, 100, 60]) <= [40, 30, 50]).all(-1)
    arr[body] = 0.0
    arr[(np.abs(ras - [180, 180, 10]) <= [4, 4, 4]).all(-1)] = 300.0  # small separate object
    spec = ModelSpec()
    mi = to_model_space(CTVolume(arr, aff), spec)
    g = mi.grid
    assert all(s % spec.pad_multiple == 0 for s in g.shape)
    lo = g.ijk_to_ras[:3, 3]
    hi = lo + (np.asarray(g.shape[::-1]) - 1) * spec.spacing_mm
    assert np.all(lo <= [60 - spec.margin_mm, 70 - spec.margin_mm, 10 - spec.margin_mm] + np.array(1e-6))
    assert np.all(hi >= [140 + spec.margin_mm, 130 + spec.margin_mm, 110 + spec.margin_mm] - np.array(1e-6))
    # the separate object is outside the crop (largest component only, minimal padding)
    assert np.any(hi < [176, 176, 200])
    assert mi.array.min() >= 0.0 and mi.array.max() <= 1.0
    centre_idx = tuple(np.round((np.array([100, 100, 60]) - lo) / spec.spacing_mm).astype(int)[::-1])
    assert abs(float(mi.array[centre_idx]) - 0.5) < 1e-3  # 0 HU in the [-1000, 1000] window
    assert float(mi.array[0, 0, 0]) == 0.0  # air


def test_max_extent_caps_the_grid():
    shape = (40, 60, 60)
    aff = make_affine((4.0, 4.0, 8.0), (0.0, 0.0, 0.0))
    arr = np.zeros(shape, np.float32)
    arr[0, 0, 0] = -1000
    spec = ModelSpec(max_extent_mm=(96.0, 96.0, 96.0))
    mi = to_model_space(CTVolume(arr, aff), spec)
    assert mi.array.shape == (32, 32, 32)


def test_no_body_is_refused():
    arr = np.full((10, 10, 10), -1000.0, np.float32)
    arr[0, 0, 0] = -900  # not constant, still no voxel above -500
    with pytest.raises(InputError, match="No body"):
        to_model_space(CTVolume(arr, np.eye(4)), validate=False)


def test_spec_and_grid_serialise():
    spec = ModelSpec(spacing_mm=2.5, margin_mm=8.0, max_extent_mm=(400, 400, 500))
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    with pytest.raises(ValueError, match="unknown"):
        ModelSpec.from_dict({**spec.to_dict(), "bogus": 1})
    grid = ModelGrid((32, 48, 16), make_affine((3, 3, 3), (1.5, -2.25, 9.0)))
    g2 = ModelGrid.from_dict(json.loads(json.dumps(grid.to_dict())))
    assert g2.shape == grid.shape and np.array_equal(g2.ijk_to_ras, grid.ijk_to_ras)


def test_shape_mismatch_is_refused():
    shape = (20, 40, 40)
    aff = make_affine((2.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    vol = CTVolume(phantom(shape, aff, radii=(25, 25, 25))[0], aff)
    grid = to_model_space(vol).grid
    with pytest.raises(InputError, match="does not match"):
        grid.to_source(np.zeros((3, 3, 3), np.float32), vol)
    with pytest.raises(InputError, match="does not match"):
        grid.labels_to_model(np.zeros((3, 3, 3), np.uint8), vol)

"""TotalSegmentator label maps come back onto the exact source grid: the mapping on its own, with
known label maps on permuted / flipped / anisotropic grids (no TotalSegmentator needed)."""

import itertools

import numpy as np
import pytest

from ctlanguage.backends.totalsegmentator import grid_map, labels_onto_source
from ctlanguage.errors import GeometryError
from ctlanguage.volume import CTVolume


def _source(shape_kji=(7, 9, 11), spacing=(0.7, 1.3, 3.0), lps=True):
    rng = np.random.default_rng(0)
    aff = np.diag(list(spacing) + [1.0])
    if lps:   # DICOM-like storage: i runs right->left, j anterior->posterior
        aff[:2] *= -1
    aff[:3, 3] = [12.5, -40.0, 101.0]
    labels = rng.integers(0, 118, size=shape_kji).astype(np.uint8)
    return CTVolume(np.zeros(shape_kji, np.float32), aff), labels


def _reorient(labels_kji, affine, perm, flip):
    """The same voxels stored with axes (i, j, k) reordered by ``perm`` and flipped by ``flip``
    (what an orientation change such as RAS<->LPS or a transpose does to a file)."""
    arr = labels_kji.T                          # [i, j, k]
    shape = np.array(arr.shape)
    new = np.eye(4)
    for a, (b, f) in enumerate(zip(perm, flip)):
        col = affine[:3, b].copy()
        new[:3, a] = -col if f else col
    # origin: the source voxel that becomes new voxel 0
    idx0 = np.array([shape[b] - 1 if f else 0 for b, f in zip(perm, flip)], float)
    src_idx = np.zeros(3)
    for a, b in enumerate(perm):
        src_idx[b] = idx0[a]
    new[:3, 3] = (affine @ np.append(src_idx, 1))[:3]
    out = np.transpose(arr, perm)
    for a, f in enumerate(flip):
        if f:
            out = np.flip(out, axis=a)
    return np.ascontiguousarray(out.T), new


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("flip", [(False, False, False), (True, True, False), (True, False, True)])
def test_every_axis_order_and_flip_maps_back_exactly(perm, flip):
    vol, labels = _source()
    out, aff = _reorient(labels, vol.ijk_to_ras, perm, flip)
    # the reoriented file really holds the same voxels at the same places
    ijk = np.array([3, 5, 2])
    r = vol.ijk_to_ras @ np.append(ijk, 1)
    o = np.round(np.linalg.inv(aff) @ r).astype(int)[:3]
    assert out[o[2], o[1], o[0]] == labels[ijk[2], ijk[1], ijk[0]]
    back = labels_onto_source(out, aff, vol)
    assert back.shape == labels.shape and np.array_equal(back, labels)


def test_identical_grid_is_returned_unchanged_including_oblique():
    vol, labels = _source(lps=False)
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    vol = CTVolume(vol.array, rot @ vol.ijk_to_ras)
    assert grid_map(vol.ijk_to_ras, vol.shape[::-1], vol.ijk_to_ras, vol.shape[::-1]) == (
        (0, 1, 2), (False, False, False))
    assert np.array_equal(labels_onto_source(labels, vol.ijk_to_ras, vol), labels)


def test_float32_affine_rounding_is_tolerated():
    vol, labels = _source()
    out, aff = _reorient(labels, vol.ijk_to_ras, (2, 0, 1), (False, True, False))
    aff32 = aff.astype(np.float32).astype(np.float64)   # what a NIfTI sform keeps
    assert np.array_equal(labels_onto_source(out, aff32, vol), labels)


@pytest.mark.parametrize("change", ["half_voxel_shift", "resampled", "other_spacing", "rotated"])
def test_a_different_grid_is_refused(change):
    vol, labels = _source()
    aff = vol.ijk_to_ras.copy()
    out = labels
    if change == "half_voxel_shift":
        aff[:3, 3] += aff[:3, 0] * 0.5
    elif change == "resampled":
        out = labels[:, :, ::2]
        aff[:3, 0] *= 2
    elif change == "other_spacing":
        aff[:3, 2] *= 1.01
    elif change == "rotated":
        c, s = np.cos(0.01), np.sin(0.01)
        aff = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ aff
    with pytest.raises(GeometryError, match="different voxel grid"):
        labels_onto_source(out, aff, vol)


def test_a_long_axis_with_slightly_other_spacing_is_refused():
    vol, _ = _source(shape_kji=(600, 4, 4), spacing=(0.7, 0.7, 0.7))
    labels = np.zeros(vol.shape, np.uint8)
    aff = vol.ijk_to_ras.copy()
    aff[:3, 2] *= 1.00002            # 0.008 mm off at the last of 600 slices
    with pytest.raises(GeometryError):
        labels_onto_source(labels, aff, vol)
    aff32 = vol.ijk_to_ras.astype(np.float32).astype(np.float64)
    assert labels_onto_source(labels, aff32, vol).shape == vol.shape

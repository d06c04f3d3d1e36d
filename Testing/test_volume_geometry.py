"""volume.py holds the only RAS<->LPS / SimpleITK conversions: checked against ITK's own
index->physical mapping for permuted, flipped and oblique grids.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ctlanguage.volume import flip_lps_ras, set_sitk_geometry, sitk_geometry, sitk_ijk_to_ras, voxel_spacing


def _affine(perm, flips, spacing, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    axes = np.eye(3)[:, perm] * np.where(flips, -1.0, 1.0)
    m = np.eye(4)
    m[:3, :3] = rot @ axes * np.asarray(spacing)
    m[:3, 3] = [12.5, -40.0, 77.0]
    return m


@pytest.mark.parametrize("perm,flips,angle", [((0, 1, 2), (False, False, False), 0.0),
                                              ((2, 0, 1), (True, False, True), 0.0),
                                              ((1, 2, 0), (False, True, False), 0.3)])
def test_itk_places_every_voxel_where_the_ras_matrix_says(perm, flips, angle):
    m = _affine(perm, flips, (0.7, 1.1, 2.5), angle)
    img = sitk.Image(5, 6, 7, sitk.sitkUInt8)
    set_sitk_geometry(img, m)
    for ijk in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
        ras = (m @ [*ijk, 1.0])[:3]
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(ijk), flip_lps_ras(ras), atol=1e-9)
    np.testing.assert_allclose(sitk_ijk_to_ras(img), m, atol=1e-12)
    np.testing.assert_allclose(voxel_spacing(m), img.GetSpacing())
    assert sitk_geometry(m)[0] == pytest.approx(img.GetSpacing())


def test_flip_is_its_own_inverse_and_rejects_other_shapes():
    m = _affine((1, 0, 2), (True, True, False), (1.0, 2.0, 3.0))
    np.testing.assert_array_equal(flip_lps_ras(flip_lps_ras(m)), m)
    pts = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]])
    np.testing.assert_array_equal(flip_lps_ras(pts), pts * [-1, -1, 1])
    with pytest.raises(ValueError):
        flip_lps_ras(np.zeros((3, 4)))


def test_degenerate_grids_are_refused():
    img = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    with pytest.raises(ValueError, match="zero-length"):
        set_sitk_geometry(img, np.diag([1.0, 0.0, 1.0, 1.0]))
    parallel = np.eye(4)
    parallel[:3, 1] = [2.0, 0.0, 0.0]      # j runs along i
    with pytest.raises(ValueError, match="parallel"):
        set_sitk_geometry(img, parallel)

"""CTVolume.validate edge cases that real scanners produce, and geometry helpers."""

import numpy as np
import pytest

from ctlanguage.errors import InputError
from ctlanguage.volume import CTVolume


def body(shape=(10, 12, 14), pad=None):
    arr = np.full(shape, -1000.0, np.float32)
    arr[2:-2, 3:-3, 3:-3] = 40.0
    arr[4, 5, 6] = 1200.0
    if pad is not None:  # circular field of view padded outside
        arr[:, 0, :] = pad
    return arr


@pytest.mark.parametrize("pad", [-3024.0, -2048.0, -32768.0])
def test_scanner_padding_values_are_accepted(pad):
    assert CTVolume(body(pad=pad), np.eye(4)).validate() is not None


@pytest.mark.parametrize("arr, match", [
    (body() + 1000.0, "Hounsfield"),                     # unrescaled raw values: no air
    (np.full((10, 12, 14), -1000.0, np.float32), "constant"),
    (body(pad=-40000.0), "not a HU range"),
    (body() * 100.0, "not a HU range"),
])
def test_values_that_cannot_be_hu_are_refused(arr, match):
    with pytest.raises(InputError, match=match):
        CTVolume(arr, np.eye(4)).validate()


def test_degenerate_affines_are_refused():
    aff = np.eye(4)
    aff[2, 2] = 0.0
    with pytest.raises(InputError, match="not invertible"):
        CTVolume(body(), aff).validate()
    with pytest.raises(InputError, match="4x4"):
        CTVolume(body(), np.eye(3))


def test_point_mapping_round_trip_and_geometry_properties():
    aff = np.array([[0, 0, -2.5, 10.0], [0.7, 0, 0, -3.0], [0, 0.8, 0, 55.0], [0, 0, 0, 1]])
    vol = CTVolume(body(), aff)
    assert np.allclose(vol.spacing, [0.7, 0.8, 2.5])
    assert np.allclose(vol.origin_ras, [10.0, -3.0, 55.0])
    assert np.allclose(np.abs(np.linalg.det(vol.direction)), 1.0)
    ijk = np.array([[0, 0, 0], [13, 11, 9], [2.5, 1.25, 7]])
    ras = vol.ijk_to_ras_points(ijk)
    assert np.allclose(ras[1], aff[:3, :3] @ [13, 11, 9] + aff[:3, 3])
    assert np.allclose(vol.ras_to_ijk_points(ras), ijk)

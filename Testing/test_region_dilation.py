"""The anatomy region a finding mask is restricted to is dilated with numpy shifts (no scipy
import per process); it must equal scipy's binary dilation by the 6-neighbour cross."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctlanguage.backends.grounded import dilate6


@pytest.mark.parametrize("shape", [(9, 7, 11), (1, 6, 5), (12, 1, 1)])
@pytest.mark.parametrize("iterations", [0, 1, 2, 4])
def test_dilate6_equals_scipy_binary_dilation(shape, iterations):
    rng = np.random.default_rng(iterations + len(shape))
    cross = ndimage.generate_binary_structure(3, 1)
    for density in (0.0, 0.02, 0.2):
        m = rng.random(shape) < density
        m[0, 0, 0] = density > 0                      # a seed on the border
        want = ndimage.binary_dilation(m, structure=cross, iterations=iterations) if iterations else m
        got = dilate6(m, iterations)
        assert got.dtype == bool and got.shape == m.shape
        np.testing.assert_array_equal(got, want)
    assert not np.shares_memory(dilate6(m, 0), m)     # the cached region is never the caller's array

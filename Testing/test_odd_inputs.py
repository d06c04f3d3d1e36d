"""Odd inputs that used to slip through (issue 13, section 3): NaN/Inf voxels in every format,
absurd voxel spacings (bounded memory, clear refusal), sheared grids (clear refusal at read time)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import _fake_engine
from ctlanguage.cli import main
from ctlanguage.errors import InputError
from ctlanguage.io import read_ct
from ctlanguage.preprocess import MAX_BODY_EXTENT_MM, ModelSpec, to_model_space
from ctlanguage.volume import CTVolume


def _ct_array(shape=(12, 14, 16), seed=0):
    arr = np.random.default_rng(seed).normal(0, 300, shape).astype(np.float32)
    arr[0, 0, 0] = -1024.0
    return arr


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_nan_and_inf_voxels_are_refused_in_every_format(tmp_path, suffix):
    arr = _ct_array()
    arr[3, 4, 5], arr[6, 7, 8], arr[1, 2, 3] = np.nan, np.inf, -np.inf
    path = tmp_path / f"ct{suffix}"
    if suffix.startswith(".nii"):
        import nibabel as nib  # what most NIfTI producers write (ITK's reader zeroes NaN/Inf)

        nib.save(nib.Nifti1Image(np.transpose(arr, (2, 1, 0)), np.diag([-0.8, -0.8, 2.0, 1.0])), path)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    with pytest.raises(InputError, match=r"contains 3 NaN or infinite voxel values"):
        read_ct(path)


def test_finite_float_nifti_is_still_read(tmp_path):
    import nibabel as nib

    arr = _ct_array()
    nib.save(nib.Nifti1Image(np.transpose(arr, (2, 1, 0)), np.diag([-0.8, -0.8, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(read_ct(tmp_path / "ct.nii.gz").array, arr)


def _sheared_nrrd(path, shear=0.3):
    img = sitk.GetImageFromArray(_ct_array())
    d = np.eye(3)
    d[:, 2] = [shear, 0.0, 1.0]
    d[:, 2] /= np.linalg.norm(d[:, 2])
    img.SetDirection(d.ravel().tolist())
    img.SetSpacing([0.8, 0.8, 2.0])
    sitk.WriteImage(img, str(path))
    assert abs(np.array(sitk.ReadImage(str(path)).GetDirection()).reshape(3, 3)[0, 2]) > shear / 2  # kept on disk


def test_sheared_grid_is_refused_at_read_time(tmp_path):
    _sheared_nrrd(tmp_path / "sheared.nrrd")
    with pytest.raises(InputError, match=r"sheared \(its i and k axes meet at 73\.30 degrees, not 90\)"):
        read_ct(tmp_path / "sheared.nrrd")
    # a rounding-level deviation (header decimals) is not a shear
    _sheared_nrrd(tmp_path / "rounded.nrrd", shear=2e-6)
    assert read_ct(tmp_path / "rounded.nrrd").shape == (12, 14, 16)


def test_sheared_grid_query_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    _fake_engine.install(monkeypatch)
    model = _fake_engine.make_fake_model_dir(tmp_path / "fake-model")
    _sheared_nrrd(tmp_path / "sheared.nrrd")
    code = main(["--quiet", "query", str(tmp_path / "sheared.nrrd"), "-p", "liver", "--out",
                 str(tmp_path / "out"), "--model", str(model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "sheared" in err[0]
    assert not (tmp_path / "out").exists()


def _ball(shape, spacing, fraction):
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    r2 = sum(((x - (n - 1) / 2) / (fraction * n / 2)) ** 2 for x, n in zip((k, j, i), shape))
    return CTVolume(np.where(r2 < 1, 40.0, -1000.0).astype(np.float32), np.diag([spacing] * 3 + [1.0]), source="ball")


def test_huge_voxels_run_in_bounded_memory():
    # 64^3 voxels of 50 mm: a 3.2 m cube. The full 3 mm lattice alone would be 1067^3 floats
    # (4.9 GB); the body (a 480 mm ball) is found on a coarser lattice and resampled alone.
    import tracemalloc

    vol = _ball((64, 64, 64), 50.0, 0.15)
    tracemalloc.start()
    try:
        mi = to_model_space(vol, ModelSpec())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 400e6, peak
    assert mi.grid.spacing == (3.0, 3.0, 3.0) and max(mi.array.shape) <= 208
    # the ball (radius 240 mm, centred) is inside the grid and has tissue values there
    centre = np.linalg.inv(mi.grid.ijk_to_ras) @ np.append(vol.ijk_to_ras_points([[31.5, 31.5, 31.5]])[0], 1.0)
    k, j, i = np.round(centre[2::-1]).astype(int)
    assert mi.array[k, j, i] == pytest.approx((40.0 + 1000.0) / 2000.0, abs=1e-3)


def test_absurd_extent_is_refused_clearly():
    vol = _ball((64, 64, 64), 50.0, 0.8)  # a "body" 2.6 m across: the spacing must be wrong
    with pytest.raises(InputError, match=r"would span 2\d{3} x 2\d{3} x 2\d{3} mm .* voxel spacing 50 x 50 x 50 mm"):
        to_model_space(vol, ModelSpec())
    assert MAX_BODY_EXTENT_MM[0] < 2000

"""CTVolume checks/hashing/SimpleITK conversion and file I/O (read_ct, atomic writers)."""

import gzip
import os
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from ctlanguage import io as ctio
from ctlanguage.errors import ExportError, InputError
from ctlanguage.volume import CTVolume


def oblique_affine(spacing=(0.8, 0.9, 2.5), origin=(-120.5, 33.25, -410.0), deg=25.0):
    t = np.radians(deg)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])  # about A
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def ct_array(shape=(12, 16, 20), seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1024, 1500, size=shape).astype(np.float32)
    arr[0, 0, 0] = -1024
    return arr


# --- CTVolume ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((16, 16), np.float32) - 1000, "3D"),
        (np.zeros((2, 16, 16, 16), np.float32) - 1000, "3D"),
        (np.zeros((0, 16, 16), np.float32), "empty"),
        (np.zeros((4, 16, 16), np.float32) - 1000, "too small"),
        (np.where(np.arange(16**3).reshape(16, 16, 16) % 7, np.float32(-1000), np.float32(np.nan)), "NaN"),
        (np.where(np.arange(16**3).reshape(16, 16, 16) % 7, np.float32(-1000), np.float32(np.inf)), "NaN or inf"),
        (np.random.default_rng(0).integers(0, 4096, (16, 16, 16)).astype(np.float32), "Hounsfield|HU"),
    ],
)
def test_validate_refuses_bad_arrays(array, match):
    with pytest.raises(InputError, match=match):
        CTVolume(array, np.eye(4)).validate()


def test_validate_refuses_non_ct_modality_and_accepts_ct():
    vol = CTVolume(ct_array(), np.eye(4), modality="MR")
    with pytest.raises(InputError, match="MR"):
        vol.validate()
    assert CTVolume(ct_array(), np.eye(4), modality="CT").validate() is not None


def test_content_hash_is_stable_and_sensitive():
    arr, aff = ct_array(), oblique_affine()
    h = CTVolume(arr, aff).content_hash()
    assert h == CTVolume(arr.copy(), aff.copy()).content_hash()
    assert len(h) == 64
    changed = arr.copy()
    changed[5, 5, 5] += 1
    assert CTVolume(changed, aff).content_hash() != h
    aff2 = aff.copy()
    aff2[0, 3] += 1e-3
    assert CTVolume(arr, aff2).content_hash() != h


def test_sitk_conversion_uses_lps():
    arr, aff = ct_array(), oblique_affine()
    img = CTVolume(arr, aff).to_sitk()
    ijk = (3, 7, 5)
    ras = aff @ [*ijk, 1]
    lps = img.TransformIndexToPhysicalPoint(ijk)
    np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)
    back = CTVolume.from_sitk(img)
    np.testing.assert_allclose(back.ijk_to_ras, aff, atol=1e-12)
    np.testing.assert_array_equal(back.array, arr)


# --- reading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_then_read_round_trip(tmp_path, suffix):
    vol = CTVolume(ct_array(), oblique_affine(), source="test")
    path = ctio.write_volume(vol, tmp_path / f"ct{suffix}")
    back = ctio.read_ct(path)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)  # NIfTI stores float32
    assert back.source == str(path)
    assert [p.name for p in tmp_path.iterdir()] == [f"ct{suffix}"]  # no temp files left


def test_read_nifti_written_by_nibabel_keeps_ras_affine(tmp_path):
    # an independent writer: the NIfTI affine *is* ijk->RAS
    arr, aff = ct_array(), oblique_affine()
    img = nib.Nifti1Image(np.transpose(arr, (2, 1, 0)).astype(np.int16), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    nib.save(img, tmp_path / "nib.nii.gz")
    vol = ctio.read_ct(tmp_path / "nib.nii.gz")
    np.testing.assert_allclose(vol.ijk_to_ras, aff, atol=1e-4)
    np.testing.assert_array_equal(vol.array, arr)


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior"])
def test_read_nrrd_written_by_pynrrd(tmp_path, space):
    arr, aff = ct_array(), oblique_affine()
    flip = np.diag([-1, -1, 1.0]) if space.startswith("left") else np.eye(3)
    header = {"space": space, "space directions": (flip @ aff[:3, :3]).T,
              "space origin": flip @ aff[:3, 3], "kinds": ["domain"] * 3}
    nrrd.write(str(tmp_path / "x.nrrd"), np.transpose(arr, (2, 1, 0)).astype(np.int16), header)
    vol = ctio.read_ct(tmp_path / "x.nrrd")
    np.testing.assert_allclose(vol.ijk_to_ras, aff, atol=1e-9)
    np.testing.assert_array_equal(vol.array, arr)


def test_read_errors(tmp_path):
    with pytest.raises(InputError, match="No such file"):
        ctio.read_ct(tmp_path / "missing.nii.gz")
    good = ctio.write_volume(CTVolume(ct_array((20, 40, 40)), np.eye(4)), tmp_path / "good.nii.gz")
    data = good.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt|corrupt"):
        ctio.read_ct(tmp_path / "trunc.nii.gz")
    (tmp_path / "garbage.nrrd").write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="corrupt|not a valid"):
        ctio.read_ct(tmp_path / "garbage.nrrd")
    (tmp_path / "empty.mha").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        ctio.read_ct(tmp_path / "empty.mha")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="Unsupported"):
        ctio.read_ct(tmp_path / "notes.txt")


def test_truncated_uncompressed_nifti(tmp_path):
    good = ctio.write_volume(CTVolume(ct_array((20, 40, 40)), np.eye(4)), tmp_path / "good.nii")
    data = good.read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) - 5000])
    with pytest.raises(InputError, match="truncated|corrupt"):
        ctio.read_ct(tmp_path / "cut.nii")


def test_read_refuses_2d_vector_mr_tagged_and_mr_values(tmp_path):
    sitk.WriteImage(sitk.Image([32, 32], sitk.sitkInt16), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="2D"):
        ctio.read_ct(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image([16, 16, 16], sitk.sitkVectorFloat32, 3), str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match="components"):
        ctio.read_ct(tmp_path / "rgb.mha")
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              "DimSize = 16 16 16\nModality = MET_MOD_MR\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    (tmp_path / "mr.mha").write_bytes(header.encode() + ct_array((16, 16, 16)).astype("<i2").tobytes())
    with pytest.raises(InputError, match="modality MR"):
        ctio.read_ct(tmp_path / "mr.mha")
    mr = np.random.default_rng(1).integers(0, 4096, (16, 20, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(mr, np.eye(4)), tmp_path / "mr_values.nii.gz")
    with pytest.raises(InputError, match="Hounsfield"):
        ctio.read_ct(tmp_path / "mr_values.nii.gz")


# --- writing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd"])
def test_write_mask_on_exact_source_grid(tmp_path, suffix):
    like = CTVolume(ct_array(), oblique_affine())
    mask = np.zeros(like.shape, np.uint8)
    mask[3:8, 4:10, 5:15] = 1
    path = ctio.write_mask(mask.astype(bool), like, tmp_path / f"mask{suffix}")
    img = sitk.ReadImage(str(path))
    assert img.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), mask)
    back = CTVolume.from_sitk(img)
    np.testing.assert_allclose(back.ijk_to_ras, like.ijk_to_ras, atol=1e-4)
    if suffix == ".nii.gz":  # the independent reader agrees on the RAS affine
        np.testing.assert_allclose(nib.load(path).affine, like.ijk_to_ras, atol=1e-4)


def test_write_labelmap_dtype_and_values(tmp_path):
    like = CTVolume(ct_array(), oblique_affine())
    labels = np.zeros(like.shape, np.int32)
    labels[1:4, 1:4, 1:4] = 7
    labels[6:9, 6:9, 6:9] = 300
    path = ctio.write_labelmap(labels, like, tmp_path / "labels.nrrd")
    data, header = nrrd.read(str(path))
    assert data.dtype == np.uint16
    np.testing.assert_array_equal(np.transpose(data, (2, 1, 0)), labels)
    with pytest.raises(ExportError, match="0..65535"):
        ctio.write_labelmap(labels - 10, like, tmp_path / "neg.nrrd")


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_write_errors_leave_nothing_behind(tmp_path, monkeypatch):
    like = CTVolume(ct_array(), np.eye(4))
    mask = np.zeros(like.shape, np.uint8)
    with pytest.raises(ExportError, match="does not exist"):
        ctio.write_mask(mask, like, tmp_path / "nope" / "m.nii.gz")
    with pytest.raises(ExportError, match="shape"):
        ctio.write_mask(np.zeros((2, 2, 2), np.uint8), like, tmp_path / "m.nii.gz")
    with pytest.raises(ExportError, match="only 0 and 1"):
        ctio.write_mask(mask + 2, like, tmp_path / "m.nii.gz")
    with pytest.raises(ExportError, match="use one of"):
        ctio.write_mask(mask, like, tmp_path / "m.png")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError):
        ctio.write_mask(mask, like, tmp_path / "afile" / "m.nii.gz")

    # an existing file survives a failing rewrite; no temp file remains
    target = ctio.write_mask(mask, like, tmp_path / "keep.nii.gz")
    before = target.read_bytes()
    from ctlanguage.exports import gzip_stream

    def failing_write(fh, head, pieces, level=1):
        fh.write(b"\x1f\x8b" + head[:50])  # half-written ...
        raise RuntimeError("disk full")     # ... then the disk fills up

    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()     # not the temp file's 0600
    monkeypatch.setattr(gzip_stream, "write_gzip", failing_write)   # the .nii.gz mask writer
    with pytest.raises(ExportError, match="disk full"):
        ctio.write_mask(mask + 1, like, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "keep.nii.gz"]
    assert gzip.decompress(before)[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")  # NIfTI-1 header


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_read_detached_headers(tmp_path, suffix):
    vol = CTVolume(ct_array(), oblique_affine())
    img = vol.to_sitk()
    sitk.WriteImage(sitk.Cast(img, sitk.sitkInt16), str(tmp_path / f"ct{suffix}"), useCompression=suffix == ".nhdr")
    assert len(list(tmp_path.iterdir())) == 2  # header + detached data file
    back = ctio.read_ct(tmp_path / f"ct{suffix}")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-9)
    data = next(p for p in tmp_path.iterdir() if p.suffix != suffix)
    data.write_bytes(data.read_bytes()[:1000])  # truncated detached data file
    with pytest.raises(InputError, match="truncated or corrupt"):
        ctio.read_ct(tmp_path / f"ct{suffix}")


def test_4d_files_single_time_point_only(tmp_path):
    arr = ct_array()
    xyzt = np.stack([np.transpose(arr, (2, 1, 0))] * 3, axis=-1).astype(np.int16)  # nibabel: [i, j, k, t]
    nib.save(nib.Nifti1Image(xyzt[..., :1], oblique_affine()), tmp_path / "t1.nii.gz")
    vol = ctio.read_ct(tmp_path / "t1.nii.gz")
    assert vol.shape == arr.shape
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.ijk_to_ras, oblique_affine(), atol=1e-4)
    nib.save(nib.Nifti1Image(xyzt, oblique_affine()), tmp_path / "t3.nii.gz")
    with pytest.raises(InputError, match="4D"):
        ctio.read_ct(tmp_path / "t3.nii.gz")

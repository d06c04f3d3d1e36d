"""DICOM series reading (selection, rescale, geometry refusals) and the CT series writer."""

import logging
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from _dicom_helpers import edit_series, files_of, legacy_converted, tilted_series
from ctlanguage.dicom_io import find_series, read_dicom_series
from ctlanguage.dicom_write import write_dicom_series
from ctlanguage.errors import ExportError, GeometryError, InputError
from ctlanguage.io import read_ct
from ctlanguage.volume import LPS_TO_RAS, CTVolume


def oblique_affine(spacing=(0.7, 0.8, 2.5), origin=(12.3, -45.6, 78.9), deg=20.0):
    t = np.radians(deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def ct_volume(shape=(10, 20, 24), affine=None, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.normal(0, 300, shape).astype(np.float32)
    arr[0, 0, 0] = -1024
    return CTVolume(arr, oblique_affine() if affine is None else affine)


def test_round_trip_geometry_and_hu(tmp_path):
    vol = ct_volume()
    uid = write_dicom_series(vol, tmp_path / "s", patient_name="Test^Patient", series_description="rt")
    back = read_ct(tmp_path / "s")
    assert back.series_uid == uid and back.modality == "CT" and back.study_uid
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    assert np.abs(back.array - vol.array).max() <= 0.5 + 1e-4  # HU stored as integers
    ds = pydicom.dcmread(files_of(tmp_path / "s")[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16 and ds.RescaleType == "HU"
    assert str(ds.PatientName) == "Test^Patient" and ds.SeriesDescription == "rt"
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in files_of(tmp_path / "s")}) == vol.shape[0]


def test_written_series_agrees_with_itk_gdcm_reader(tmp_path):
    # an independent reader (ITK/GDCM) must see the same grid and HU values
    vol = ct_volume(affine=oblique_affine(deg=-35.0))
    write_dicom_series(vol, tmp_path)
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    img = reader.Execute()
    itk_vol = CTVolume.from_sitk(img)
    np.testing.assert_allclose(itk_vol.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    assert np.abs(itk_vol.array - vol.array).max() <= 0.5 + 1e-4


def test_large_hu_range_uses_a_slope(tmp_path):
    vol = ct_volume()
    vol.array[5, 5, 5] = 90000.0  # beyond int16 even with slope 1
    write_dicom_series(vol, tmp_path)
    ds = pydicom.dcmread(files_of(tmp_path)[0])
    slope = float(ds.RescaleSlope)
    assert slope > 1
    back = read_dicom_series(tmp_path, validate=False)
    assert np.abs(back.array - vol.array).max() <= slope / 2 + 1e-3


def test_slice_order_comes_from_positions_not_file_names(tmp_path):
    vol = ct_volume()
    write_dicom_series(vol, tmp_path / "a")
    files = files_of(tmp_path / "a")
    rng = np.random.default_rng(3)
    for n, p in enumerate(rng.permutation(files)):
        p.rename(tmp_path / "a" / f"zz{n:03d}_{p.name}")
    back = read_ct(tmp_path / "a")
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    assert np.abs(back.array - vol.array).max() <= 0.5 + 1e-4


def test_picks_ct_series_with_most_slices_and_logs_it(tmp_path, caplog):
    small, big = ct_volume((9, 20, 24)), ct_volume((14, 20, 24), seed=1)
    write_dicom_series(small, tmp_path / "x" / "one", series_description="small")
    uid_big = write_dicom_series(big, tmp_path / "y" / "deep" / "two", series_description="big")
    write_dicom_series(ct_volume((20, 20, 24), seed=2), tmp_path / "z", modality="MR", series_description="mr")
    assert len(find_series(tmp_path)) == 3
    with caplog.at_level(logging.INFO, logger="ctlanguage.dicom_io"):
        vol = read_ct(tmp_path)
    assert vol.series_uid == uid_big and vol.shape == (14, 20, 24)
    assert len(vol.metadata["skipped_series"]) == 2 and vol.metadata["n_slices"] == 14
    text = caplog.text
    assert "big" in text and "Skipped" in text and "small" in text and "modality MR" in text


def test_refuses_mr_sr_and_empty_folders(tmp_path):
    write_dicom_series(ct_volume(), tmp_path / "mr", modality="MR")
    with pytest.raises(InputError, match="no CT image series.*MR"):
        read_ct(tmp_path / "mr")

    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID
    sr.Modality = "SR"
    sr.SeriesInstanceUID = generate_uid()
    (tmp_path / "sr").mkdir()
    sr.save_as(tmp_path / "sr" / "report.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="no CT image series.*SR"):
        read_ct(tmp_path / "sr")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("not dicom")
    with pytest.raises(InputError, match="no DICOM files"):
        read_ct(tmp_path / "empty")
    (tmp_path / "empty" / "ct.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="no DICOM files .*ct.nii.gz: open that file instead"):
        read_ct(tmp_path / "empty")


def test_gantry_tilted_series_is_resampled_exactly_with_a_warning(tmp_path, caplog):
    truth, hu = tilted_series(tmp_path, deg=15.0)
    with caplog.at_level(logging.WARNING, logger="ctlanguage.dicom_io"):
        vol = read_ct(tmp_path)
    assert "gantry tilt (15.0 degrees)" in caplog.text and "orthogonal grid" in caplog.text
    assert vol.metadata["gantry_tilt_deg"] == pytest.approx(15.0, abs=1e-3)
    d = vol.direction
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-9)  # an orthogonal grid now
    # every output voxel inside the acquired data holds the HU of its own position
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in vol.shape], indexing="ij")
    lps = (np.stack([i, j, k], -1).reshape(-1, 3) @ vol.ijk_to_ras[:3, :3].T + vol.ijk_to_ras[:3, 3]) @ LPS_TO_RAS[:3, :3]
    src = (lps - truth[:3, 3]) @ np.linalg.inv(truth[:3, :3]).T  # continuous index in the stored data
    np.testing.assert_allclose(src[:, 2], np.round(src[:, 2]), atol=1e-6)  # slices are the acquired planes
    inside = np.all((src >= -1e-6) & (src <= np.array([23, 19, 9]) + 1e-6), axis=1)
    assert inside.sum() >= 0.95 * 10 * 20 * 24  # all but the fractional edge rows of each plane
    err = np.abs(vol.array.reshape(-1)[inside] - hu(lps[inside]))
    assert err.max() <= 0.5 + 1e-3  # integer HU storage; bilinear interpolation of a linear field is exact
    assert np.all(vol.array.reshape(-1)[~inside & np.all(np.abs(src - np.clip(src, 0, [23, 19, 9])) > 0.51, axis=1)]
                  == pytest.approx(-1024.0))


def test_irregular_sideways_wander_is_refused(tmp_path):
    tilted_series(tmp_path, deg=10.0)
    target = sorted(files_of(tmp_path), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))[4]
    ds = pydicom.dcmread(target)
    pos = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [pos[0] + 3.0, pos[1], pos[2]]
    ds.save_as(target)
    with pytest.raises(GeometryError, match="wander sideways irregularly"):
        read_ct(tmp_path)


def test_missing_slice_is_refused_with_the_gap(tmp_path):
    write_dicom_series(ct_volume(), tmp_path)
    files = sorted(files_of(tmp_path), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    files[4].unlink()
    with pytest.raises(GeometryError, match=r"gap of 5\.000 mm.*2\.500 mm.*1 missing slice"):
        read_ct(tmp_path)


def test_duplicate_slice_is_refused(tmp_path):
    write_dicom_series(ct_volume(), tmp_path)
    src = files_of(tmp_path)[3]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "copy.dcm")
    with pytest.raises(GeometryError, match="same position"):
        read_ct(tmp_path)


def test_per_slice_rescale_is_applied(tmp_path):
    vol = ct_volume()
    write_dicom_series(vol, tmp_path)
    target = files_of(tmp_path)[2]
    ds = pydicom.dcmread(target)
    k = int(ds.InstanceNumber) - 1
    raw = ds.pixel_array.astype(np.int32)
    ds.PixelData = np.round((raw - 1024) / 2).astype("<i2").tobytes()  # store HU/2 ...
    ds.RescaleSlope, ds.RescaleIntercept = 2, 0  # ... and say so
    ds.save_as(target)
    back = read_ct(tmp_path)
    assert np.abs(back.array[k] - vol.array[k]).max() <= 1.5 + 1e-4
    assert np.abs(back.array - vol.array).max() <= 1.5 + 1e-4


def test_corrupt_slice_and_writer_errors(tmp_path):
    write_dicom_series(ct_volume(), tmp_path / "s")
    p = files_of(tmp_path / "s")[0]
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 200])  # truncated pixel data
    with pytest.raises(InputError):
        read_ct(tmp_path / "s")

    sheared = oblique_affine()
    sheared[:3, 2] += [0.5, 0.0, 0.0]  # slice axis not perpendicular to the slices
    with pytest.raises(GeometryError, match="perpendicular"):
        write_dicom_series(ct_volume(affine=sheared), tmp_path / "sh")
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(ExportError):
        write_dicom_series(ct_volume(), tmp_path / "blocker" / "series")
    shutil.rmtree(tmp_path / "s")


def test_written_series_is_accepted_by_highdicom_seg(tmp_path):
    # DICOM SEG export builds on these series: highdicom must accept them as source images
    import highdicom as hd
    from pydicom.sr.codedict import codes

    vol = ct_volume()
    write_dicom_series(vol, tmp_path / "ct")
    sources = sorted((pydicom.dcmread(p) for p in files_of(tmp_path / "ct")), key=lambda d: int(d.InstanceNumber))
    mask = np.zeros(vol.shape, np.uint8)
    mask[3:6, 5:12, 6:15] = 1
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=generate_uid(), series_number=2, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="CTLanguage", manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert int(seg.NumberOfFrames) == 3


def _gdcm_compress(ds, tmp_path, compressor):
    """Pixel data of ``ds`` re-encoded by GDCM (SimpleITK's DICOM writer)."""
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetUseCompression(True)
    writer.SetCompressor(compressor)
    writer.SetFileName(str(tmp_path / "c.dcm"))
    writer.Execute(sitk.GetImageFromArray(ds.pixel_array[None]))
    c = pydicom.dcmread(tmp_path / "c.dcm")
    ds["PixelData"] = c["PixelData"]
    ds.file_meta.TransferSyntaxUID = c.file_meta.TransferSyntaxUID
    (tmp_path / "c.dcm").unlink()


_COMPRESSIONS = {
    # transfer syntax: how to compress one slice in place
    "1.2.840.10008.1.2.5": lambda ds, tmp: ds.compress("1.2.840.10008.1.2.5"),  # RLE (pydicom)
    "1.2.840.10008.1.2.4.70": lambda ds, tmp: _gdcm_compress(ds, tmp, "JPEG"),  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": lambda ds, tmp: ds.compress("1.2.840.10008.1.2.4.80",
                                                           encoding_plugin="pyjpegls"),  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90": lambda ds, tmp: _gdcm_compress(ds, tmp, "JPEG2000"),  # JPEG 2000 lossless
}


@pytest.mark.parametrize("syntax", sorted(_COMPRESSIONS), ids=["jpeg-lossless", "jpeg-ls", "jpeg2000", "rle"])
def test_compressed_series_per_transfer_syntax(tmp_path, syntax):
    vol = ct_volume()
    write_dicom_series(vol, tmp_path / "s")
    for p in files_of(tmp_path / "s"):
        ds = pydicom.dcmread(p)
        _COMPRESSIONS[syntax](ds, tmp_path)
        ds.save_as(p)
    assert pydicom.dcmread(files_of(tmp_path / "s")[0]).file_meta.TransferSyntaxUID == syntax
    back = read_ct(tmp_path / "s")
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    assert np.abs(back.array - vol.array).max() <= 0.5 + 1e-4  # lossless: only the HU rounding


def test_a_single_file_stands_for_its_own_series(tmp_path):
    small, big = ct_volume((9, 20, 24)), ct_volume((14, 20, 24), seed=1)
    uid_small = write_dicom_series(small, tmp_path, series_description="small")
    write_dicom_series(big, tmp_path, series_description="big")
    one = next(p for p in files_of(tmp_path) if pydicom.dcmread(p).SeriesInstanceUID == uid_small)
    vol = read_ct(one)
    assert vol.series_uid == uid_small and vol.shape == small.shape
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="junk.dcm"):
        read_ct(tmp_path / "junk.dcm")


def test_multiframe_without_plane_geometry_is_refused_clearly(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "CT", generate_uid()
    ds.Rows = ds.Columns = 16
    ds.NumberOfFrames = 12
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((12, 16, 16), "<i2").tobytes()
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="enhanced.dcm .frame 1. has no Plane Position / Plane Orientation / Pixel Measures"):
        read_ct(tmp_path)


def test_multiframe_ct_reads_like_its_classic_series(tmp_path):
    vol = ct_volume(affine=oblique_affine(deg=-25.0))
    vol.array[4] += 200.0  # per-slice content, so that a frame order error shows
    write_dicom_series(vol, tmp_path / "classic")
    legacy_converted(tmp_path / "classic", tmp_path / "mf")
    classic, multi = read_ct(tmp_path / "classic"), read_ct(tmp_path / "mf")
    assert multi.metadata["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2.2" and multi.shape == vol.shape
    np.testing.assert_allclose(multi.ijk_to_ras, classic.ijk_to_ras, atol=1e-6)
    np.testing.assert_array_equal(multi.array, classic.array)


def test_multiframe_gantry_tilt_is_resampled_like_the_classic_series(tmp_path):
    tilted_series(tmp_path / "classic", deg=12.0)
    legacy_converted(tmp_path / "classic", tmp_path / "mf")
    classic, multi = read_ct(tmp_path / "classic"), read_ct(tmp_path / "mf")
    assert multi.metadata["gantry_tilt_deg"] == pytest.approx(12.0, abs=1e-3)
    np.testing.assert_allclose(multi.ijk_to_ras, classic.ijk_to_ras, atol=1e-6)
    np.testing.assert_allclose(multi.array, classic.array, atol=1e-3)


def _pydicom_test_file(name):
    """A file from pydicom's published test data (the pydicom-data package), or skip."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except Exception:  # noqa: BLE001 - pydicom-data not installed
        path = None
    if path is None:
        pytest.skip(f"{name} needs the pydicom-data package (requirements.lock.txt)")
    return path


def test_enhanced_ct_from_a_vendor_matches_highdicom(tmp_path):
    # eCT_Supplemental.dcm: a 2-frame Enhanced CT Image Storage object with per-frame positions
    # and a shared rescale; compared with highdicom's independent reading of the same file
    import highdicom as hd

    path = _pydicom_test_file("eCT_Supplemental.dcm")
    shutil.copy(path, tmp_path / "ect.dcm")
    vol = read_dicom_series(tmp_path, validate=False)  # two frames: too thin to pass validate()
    assert vol.shape == (2, 512, 512) and vol.metadata["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2.1"
    ref = hd.imread(str(path)).get_volume()  # ref.affine: (array index a, b, c) -> LPS
    k, j, i = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(np.float64)
    lps = (ijk @ vol.ijk_to_ras[:3, :3].T + vol.ijk_to_ras[:3, 3]) @ LPS_TO_RAS[:3, :3]
    abc = (lps - ref.affine[:3, 3]) @ np.linalg.inv(ref.affine[:3, :3]).T
    np.testing.assert_allclose(abc, np.round(abc), atol=1e-4)  # every voxel centre is one of theirs
    a, b, c = np.round(abc).astype(int).T
    np.testing.assert_array_equal(vol.array.reshape(-1), ref.array[a, b, c].astype(np.float32))


def test_dicom_and_canonical_nifti_give_the_same_model_input(tmp_path):
    import nibabel as nib

    from ctlanguage.preprocess import to_model_space

    shape = (16, 48, 44)
    aff = np.array([[-1.1, 0, 0, 30.0], [0, -1.2, 0, 25.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    body = ((i - 21.5) / 16) ** 2 + ((j - 23.5) / 18) ** 2 < 1
    arr = np.where(body, np.round(40 + 60 * np.sin(i / 4.0) + 20 * k), -1000).astype(np.float32)
    write_dicom_series(CTVolume(arr, aff), tmp_path / "dcm")
    from_dicom = read_ct(tmp_path / "dcm")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(np.transpose(arr, (2, 1, 0)).astype(np.int16), aff))
    assert np.all(np.diag(canonical.affine)[:3] > 0)  # really re-ordered to RAS on disk
    nib.save(canonical, tmp_path / "ct.nii.gz")
    from_nifti = read_ct(tmp_path / "ct.nii.gz")
    a, b = to_model_space(from_dicom), to_model_space(from_nifti)
    np.testing.assert_allclose(a.grid.ijk_to_ras, b.grid.ijk_to_ras, atol=1e-4)
    np.testing.assert_allclose(a.array, b.array, atol=1e-4)


def test_left_handed_grid_reads_back_as_the_same_physical_image(tmp_path):
    # i towards L, j towards A, k towards S: slice normal (row x col) points inferior, so the
    # reader (which sorts along the normal) returns k reversed; the physical image is identical
    aff = np.array([[-1.0, 0, 0, -20.0], [0, 0.9, 0, 5.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    vol = ct_volume(affine=aff)
    write_dicom_series(vol, tmp_path)
    back = read_ct(tmp_path)
    flipped = aff.copy()
    flipped[:3, 3] += aff[:3, 2] * (vol.shape[0] - 1)
    flipped[:3, 2] *= -1
    np.testing.assert_allclose(back.ijk_to_ras, flipped, atol=1e-4)
    assert np.abs(back.array[::-1] - vol.array).max() <= 0.5 + 1e-4


def test_localizers_are_left_out_with_an_info_line(tmp_path, caplog):
    vol = ct_volume()
    uid = write_dicom_series(vol, tmp_path / "s")
    ref = pydicom.dcmread(files_of(tmp_path / "s")[0])
    # a scout inside the same series (some scanners do this) and one as its own series
    for name, series_uid in (("scout_same.dcm", uid), ("scout_own.dcm", generate_uid())):
        scout = pydicom.dcmread(files_of(tmp_path / "s")[0])
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.SeriesInstanceUID = series_uid
        scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal projection
        scout.Rows, scout.Columns = 30, 24
        scout.PixelData = np.zeros((30, 24), "<i2").tobytes()
        scout.save_as(tmp_path / "s" / name)
    with caplog.at_level(logging.INFO, logger="ctlanguage.dicom_io"):
        back = read_ct(tmp_path / "s")
    assert back.series_uid == uid and back.shape == vol.shape
    assert np.abs(back.array - vol.array).max() <= 0.5 + 1e-4
    assert caplog.text.count("Left out 1 localizer (scout) image(s)") == 2
    assert "only localizer images" in caplog.text
    assert [p.rsplit("/", 1)[-1] for p in back.metadata["left_out_localizers"]] == ["scout_same.dcm"]
    assert ref.SOPInstanceUID in back.metadata["sop_instance_uids"]


@pytest.mark.parametrize("also_file_meta", [False, True])
def test_files_without_sop_class_uid_are_dicom(tmp_path, also_file_meta):
    vol = ct_volume()
    write_dicom_series(vol, tmp_path / "s")

    def drop(ds):
        del ds.SOPClassUID
        if also_file_meta:
            del ds.file_meta.MediaStorageSOPClassUID

    edit_series(tmp_path / "s", drop)
    back_ds = pydicom.dcmread(files_of(tmp_path / "s")[0])
    assert "SOPClassUID" not in back_ds
    assert ("MediaStorageSOPClassUID" in back_ds.file_meta) != also_file_meta
    back = read_ct(tmp_path / "s")
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    assert np.abs(back.array - vol.array).max() <= 0.5 + 1e-4


@pytest.mark.parametrize("how", ["removed", "blank"])
def test_series_without_uids_reads_with_no_invented_series_uid(tmp_path, how):
    vol = ct_volume()
    write_dicom_series(vol, tmp_path / "s")

    def strip(ds):
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if how == "removed":
                delattr(ds, kw)
            else:
                setattr(ds, kw, "")

    edit_series(tmp_path / "s", strip)
    back = read_ct(tmp_path / "s")
    assert back.series_uid is None and back.study_uid is None
    assert len(back.metadata["files"]) == vol.shape[0]
    one = read_ct(files_of(tmp_path / "s")[3])  # a single file stands for its UID-less series
    np.testing.assert_array_equal(one.array, back.array)

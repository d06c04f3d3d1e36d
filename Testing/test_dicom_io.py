"""DICOM series reading (selection, rescale, geometry refusals) and the CT series writer."""

import logging
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ctlanguage.dicom_io import find_series, read_dicom_series, write_dicom_series
from ctlanguage.errors import ExportError, GeometryError, InputError
from ctlanguage.io import read_ct
from ctlanguage.volume import CTVolume


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


def files_of(folder):
    return sorted(p for p in folder.rglob("*.dcm"))


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


def _edit_series(folder, fn):
    for p in files_of(folder):
        ds = pydicom.dcmread(p)
        fn(ds)
        ds.save_as(p)


def test_gantry_tilt_is_refused(tmp_path):
    vol = ct_volume(affine=oblique_affine(deg=0.0))
    write_dicom_series(vol, tmp_path)
    tilt = np.tan(np.radians(12.0))

    def shear(ds):
        pos = [float(v) for v in ds.ImagePositionPatient]
        pos[1] += tilt * pos[2]  # y drifts with z: slices along a tilted line
        ds.ImagePositionPatient = [round(v, 4) for v in pos]

    _edit_series(tmp_path, shear)
    with pytest.raises(GeometryError, match="gantry tilt.*12.0 degrees"):
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


def test_compressed_series_rle_and_jpeg_lossless(tmp_path):
    vol = ct_volume()
    # RLE Lossless (pydicom encodes and decodes it natively)
    write_dicom_series(vol, tmp_path / "rle")
    for p in files_of(tmp_path / "rle"):
        ds = pydicom.dcmread(p)
        ds.compress("1.2.840.10008.1.2.5")
        ds.save_as(p)
    assert pydicom.dcmread(files_of(tmp_path / "rle")[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    back = read_ct(tmp_path / "rle")
    assert np.abs(back.array - vol.array).max() <= 0.5 + 1e-4

    # JPEG Lossless (process 14): pydicom has no decoder here, the reader falls back to GDCM
    write_dicom_series(vol, tmp_path / "jpeg")
    for n, p in enumerate(files_of(tmp_path / "jpeg")):
        ds = pydicom.dcmread(p)
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.SetFileName(str(tmp_path / f"c{n}.dcm"))
        writer.Execute(sitk.GetImageFromArray(ds.pixel_array[None]))
        c = pydicom.dcmread(tmp_path / f"c{n}.dcm")
        ds["PixelData"] = c["PixelData"]
        ds.file_meta.TransferSyntaxUID = c.file_meta.TransferSyntaxUID
        ds.save_as(p)
        (tmp_path / f"c{n}.dcm").unlink()
    ts = pydicom.dcmread(files_of(tmp_path / "jpeg")[0]).file_meta.TransferSyntaxUID
    assert ts == "1.2.840.10008.1.2.4.70"
    back = read_ct(tmp_path / "jpeg")
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    assert np.abs(back.array - vol.array).max() <= 0.5 + 1e-4


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


def test_enhanced_multiframe_ct_is_refused_clearly(tmp_path):
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
    with pytest.raises(InputError, match="multi-frame"):
        read_ct(tmp_path)


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

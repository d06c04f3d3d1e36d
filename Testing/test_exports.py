"""Exports: NIfTI masks (geometry), .seg.nrrd (read back by slicer-core), DICOM SEG (read back by
highdicom, references the source series), CSV/JSON, HTML report, all-or-nothing writes."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from _export_helpers import MODEL_INFO, synthetic_findings, synthetic_volume
from ctlanguage.errors import ExportError
from ctlanguage.exports import export_all, slugify, unique_slugs

SHAPE = (24, 40, 48)


def _rot_affine():
    """Oblique, permuted-sign geometry: rotation about S by 30 degrees, anisotropic spacing."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([-0.7, 0.8, 2.0])
    m[:3, 3] = [12.5, -40.25, 101.0]
    return m


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    from ctlanguage.dicom_write import write_dicom_series
    from ctlanguage.io import read_ct

    folder = tmp_path_factory.mktemp("dicom") / "series"
    uid = write_dicom_series(synthetic_volume(SHAPE), folder)
    vol = read_ct(folder)
    assert vol.series_uid == uid
    return folder, uid, vol


# --------------------------------------------------------------------------------- slugs

def test_slugs_are_safe_and_unique():
    assert slugify("Fluid around the LEFT lung!") == "fluid-around-the-left-lung"
    assert slugify("épanchement pleural gauche") == "epanchement-pleural-gauche"
    assert slugify("肝臓") == "prompt"
    assert len(slugify("x" * 10000)) <= 60
    assert unique_slugs(["liver", "Liver", "liver?"]) == ["liver", "liver-2", "liver-3"]


# --------------------------------------------------------------------------------- NIfTI masks

@pytest.mark.parametrize("affine", [None, "oblique"])
def test_nifti_masks_have_exact_source_geometry(tmp_path, affine):
    import SimpleITK as sitk

    from ctlanguage.io import read_ct

    vol = synthetic_volume(SHAPE, _rot_affine() if affine else None)
    fs = synthetic_findings(SHAPE)
    res = export_all(vol, fs, tmp_path / "out", model=MODEL_INFO, formats=("masks", "json"))
    doc = json.loads((tmp_path / "out" / "findings.json").read_text())
    for f, rec in zip(fs, doc["findings"]):
        p = tmp_path / "out" / rec["mask"]
        back = read_ct(p, validate=False)
        assert back.array.shape == vol.array.shape
        np.testing.assert_array_equal(back.array.astype(np.uint8), f.mask)
        np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
        assert sitk.ReadImage(str(p)).GetPixelID() == sitk.sitkUInt8
    assert len(res.masks) == len(fs)


# --------------------------------------------------------------------------------- seg.nrrd

def _read_seg_with_slicer(path: Path):
    slicer = pytest.importorskip("slicer")
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    seg = node.GetSegmentation()
    out = []
    for n in range(seg.GetNumberOfSegments()):
        s = seg.GetNthSegment(n)
        img = s.GetRepresentation("Binary labelmap")
        arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())
        ext = img.GetExtent()
        dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
        arr = arr.reshape(dims) if arr.size == np.prod(dims) else arr
        m = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else None
        if m is None:
            import vtk

            m = vtk.vtkMatrix4x4()
        img.GetImageToWorldMatrix(m)
        ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        full = np.zeros(SHAPE, np.uint8)
        if arr.size and ext[1] >= ext[0]:
            full[ext[4]:ext[5] + 1, ext[2]:ext[3] + 1, ext[0]:ext[1] + 1] = (arr == s.GetLabelValue())
        term = s.GetTerminology() if hasattr(s, "GetTerminology") else ""
        out.append({"name": s.GetName(), "color": s.GetColor(), "terminology": term,
                    "mask": full, "ijk_to_ras": ijk_to_ras})
    return out


def test_seg_nrrd_is_read_by_slicer_core_with_names_colours_terminology(tmp_path):
    vol = synthetic_volume(SHAPE)
    fs = synthetic_findings(SHAPE)  # liver and liver lesion overlap -> two layers
    export_all(vol, fs, tmp_path / "out", model=MODEL_INFO, formats=("seg_nrrd",))
    segs = _read_seg_with_slicer(tmp_path / "out" / "segmentation.seg.nrrd")
    assert [s["name"] for s in segs] == [f.prompt for f in fs]
    for s, f in zip(segs, fs):
        np.testing.assert_array_equal(s["mask"], f.mask, err_msg=f.prompt)
        np.testing.assert_allclose(s["ijk_to_ras"], vol.ijk_to_ras, atol=1e-6)
        assert all(0.0 <= c <= 1.0 for c in s["color"])
    liver, lesion = segs[0], segs[1]
    assert "SCT^10200004^Liver" in liver["terminology"]
    assert "10200004" in lesion["terminology"]  # lesion's anatomic region is the liver


def test_seg_nrrd_header_conventions(tmp_path):
    import nrrd

    vol = synthetic_volume(SHAPE, _rot_affine())
    fs = synthetic_findings(SHAPE)
    export_all(vol, fs, tmp_path / "o", model=MODEL_INFO, formats=("seg_nrrd",))
    data, hdr = nrrd.read(str(tmp_path / "o" / "segmentation.seg.nrrd"))
    assert hdr["space"] == "left-posterior-superior"
    assert list(hdr["kinds"]) == ["list", "domain", "domain", "domain"]  # overlapping -> layers
    assert data.shape[1:] == SHAPE[::-1]
    assert hdr["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert hdr["Segment1_Name"] == "liver lesion"
    assert hdr["Segment0_Layer"] != hdr["Segment1_Layer"]
    np.testing.assert_allclose(hdr["space origin"], vol.ijk_to_ras[:3, 3] * [-1, -1, 1])


# --------------------------------------------------------------------------------- DICOM SEG

def test_dicom_seg_read_back_with_highdicom(tmp_path, dicom_case):
    import highdicom as hd
    import pydicom

    folder, uid, vol = dicom_case
    fs = synthetic_findings(SHAPE)
    res = export_all(vol, fs, tmp_path / "out", model=MODEL_INFO)
    path = res.files["segmentation.dcm"]
    seg = hd.seg.segread(str(path))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert seg.StudyInstanceUID == vol.study_uid or vol.study_uid is None
    assert seg.number_of_segments == len(fs)
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert labels == [f.prompt for f in fs]
    liver = seg.get_segment_description(1)
    assert liver.segmented_property_type.value == "10200004"
    assert liver.segmented_property_type.scheme_designator == "SCT"
    lesion = seg.get_segment_description(2)
    assert lesion.segmented_property_category.scheme_designator == "SCT"
    assert [c.value for c in lesion.anatomic_regions] == ["10200004"]
    # pixel data: frames line up with the source instances
    srcs = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()),
                  key=lambda d: float(d.ImagePositionPatient[2]))
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in srcs],
        segment_numbers=list(seg.segment_numbers), combine_segments=False,
        assert_missing_frames_are_empty=True)
    # the writer maps k -> slices in increasing S (the synthetic volume has +S along k)
    for n, f in enumerate(fs):
        np.testing.assert_array_equal(px[..., n], f.mask, err_msg=f.prompt)


def test_dicom_seg_not_written_for_file_input(tmp_path):
    vol = synthetic_volume(SHAPE, source=str(tmp_path / "ct.nii.gz"))
    res = export_all(vol, synthetic_findings(SHAPE), tmp_path / "out", model=MODEL_INFO)
    assert "segmentation.dcm" not in res.files
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".ctlanguage-files.json",
        "findings.csv", "findings.json", "masks", "report.html", "segmentation.seg.nrrd"]


# --------------------------------------------------------------------------------- tables, report

def test_findings_json_and_csv_contract(tmp_path):
    vol = synthetic_volume(SHAPE, source="/data/ct.nii.gz")
    fs = synthetic_findings(SHAPE)
    export_all(vol, fs, tmp_path / "out", model=MODEL_INFO, mask_threshold=0.4)
    doc = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert doc["model"] == MODEL_INFO
    assert doc["input"]["shape"] == list(SHAPE)
    assert doc["input"]["path"] == "/data/ct.nii.gz"
    np.testing.assert_allclose(doc["input"]["affine"], vol.ijk_to_ras)
    assert doc["mask_threshold"] == 0.4
    keys = {"prompt", "anatomy", "finding", "laterality", "probability", "prompt_confidence",
            "mask", "volume_ml", "codes"}
    for rec in doc["findings"]:
        assert keys <= set(rec)
        assert (tmp_path / "out" / rec["mask"]).is_file()
    assert doc["findings"][1]["probability"] == pytest.approx(0.81)
    assert doc["findings"][0]["probability"] is None
    rows = list(csv.DictReader(open(tmp_path / "out" / "findings.csv", encoding="utf-8")))
    assert [r["prompt"] for r in rows] == [f.prompt for f in fs]
    assert rows[3]["laterality"] == "right" and float(rows[3]["probability"]) == pytest.approx(0.07)


def test_html_report_has_table_images_model_and_notice(tmp_path):
    vol = synthetic_volume(SHAPE)
    fs = synthetic_findings(SHAPE)
    fs[0].prompt = "liver <b>&"  # escaped
    export_all(vol, fs, tmp_path / "out", model=MODEL_INFO, formats=("html",))
    text = (tmp_path / "out" / "report.html").read_text()
    assert "Research use only" in text
    assert "test-model" in text and "0.0.1" in text
    assert "liver &lt;b&gt;&amp;" in text and "<b>&" not in text
    non_empty = sum(1 for f in fs if f.mask.any())
    assert text.count("data:image/png;base64,") == 2 * non_empty
    assert "0.810" in text


def test_key_images_follow_radiological_convention():
    """The same anatomy stored with flipped voxel axes gives the same axial picture."""
    from ctlanguage.exports.html_report import ras_view

    vol = synthetic_volume(SHAPE)
    flipped = vol.array[::-1, ::-1, :]  # flip k and j
    m = vol.ijk_to_ras.copy()
    m[:3, 3] = vol.ijk_to_ras[:3, :3] @ [0, SHAPE[1] - 1, SHAPE[0] - 1] + vol.ijk_to_ras[:3, 3]
    m[:3, 1] *= -1
    m[:3, 2] *= -1
    a, sp_a = ras_view(vol.array, vol.ijk_to_ras)
    b, sp_b = ras_view(flipped, m)
    np.testing.assert_array_equal(a, b)
    assert sp_a == pytest.approx(sp_b)


# --------------------------------------------------------------------------------- failures

def _listing(d: Path):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_disk_full_during_export_leaves_no_partial_files(tmp_path, monkeypatch):
    import ctlanguage.exports.seg_nrrd as seg_nrrd

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(seg_nrrd, "write_seg_nrrd", full)
    vol = synthetic_volume(SHAPE)
    out = tmp_path / "new" / "out"
    with pytest.raises(ExportError, match="disk is full"):
        export_all(vol, synthetic_findings(SHAPE), out, model=MODEL_INFO)
    assert not out.exists()  # created by the call, removed again
    # an existing folder keeps exactly its old content
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "findings.json").write_text("old")
    (keep / "notes.txt").write_text("mine")
    before = _listing(keep)
    with pytest.raises(ExportError):
        export_all(vol, synthetic_findings(SHAPE), keep, model=MODEL_INFO)
    assert _listing(keep) == before
    assert (keep / "findings.json").read_text() == "old"


def test_disk_full_in_low_level_write(tmp_path, monkeypatch):
    """ENOSPC raised by the very last file write (the report) still rolls everything back."""
    import builtins

    real_open = builtins.open

    def fake_open(file, mode="r", *a, **k):
        if str(file).endswith("report.html") and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="nothing was written"):
        export_all(synthetic_volume(SHAPE), synthetic_findings(SHAPE), out, model=MODEL_INFO)
    assert not out.exists()


def test_output_folder_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="not writable"):
        export_all(synthetic_volume(SHAPE), synthetic_findings(SHAPE), blocker / "out", model=MODEL_INFO)
    with pytest.raises(ExportError, match="not writable"):
        export_all(synthetic_volume(SHAPE), synthetic_findings(SHAPE), blocker, model=MODEL_INFO)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_output_folder_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="not writable"):
            export_all(synthetic_volume(SHAPE), synthetic_findings(SHAPE), ro, model=MODEL_INFO)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_reexport_replaces_previous_results(tmp_path):
    vol = synthetic_volume(SHAPE)
    fs = synthetic_findings(SHAPE)
    export_all(vol, fs, tmp_path / "out", model=MODEL_INFO)
    export_all(vol, fs[:1], tmp_path / "out", model=MODEL_INFO)
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["liver.nii.gz"]
    # only the list of what we wrote (no staging folder or backup left)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == [
        ".ctlanguage-files.json"]


def test_mask_shape_mismatch_is_refused(tmp_path):
    fs = synthetic_findings(SHAPE)
    fs[0].mask = fs[0].mask[:-1]
    with pytest.raises(ExportError, match="shape"):
        export_all(synthetic_volume(SHAPE), fs, tmp_path / "out", model=MODEL_INFO)
    assert not (tmp_path / "out").exists()


def test_seg_nrrd_non_ascii_and_long_names_round_trip_in_slicer(tmp_path):
    vol = synthetic_volume(SHAPE)
    fs = synthetic_findings(SHAPE)[:2]
    fs[0].prompt = "épanchement pleural — 肺"
    fs[1].prompt = "lesion " * 300
    export_all(vol, fs, tmp_path / "out", model=MODEL_INFO, formats=("seg_nrrd",))
    segs = _read_seg_with_slicer(tmp_path / "out" / "segmentation.seg.nrrd")
    assert segs[0]["name"] == "épanchement pleural — 肺"
    assert segs[1]["name"] == fs[1].prompt.strip()


def test_dicom_seg_from_reoriented_volume_lines_up_with_source(tmp_path, dicom_case):
    """Masks on a permuted/flipped copy of the grid still land on the right source pixels, and
    every instance of the series is referenced even when only some hold segment voxels."""
    import highdicom as hd
    import pydicom

    from ctlanguage.volume import CTVolume

    folder, uid, vol = dicom_case
    fs = synthetic_findings(SHAPE)
    # new grid: array axes (k, j, i) -> (i, k, j) with k flipped
    perm_arr = np.ascontiguousarray(vol.array[::-1].transpose(2, 0, 1))
    n_k = SHAPE[0]
    old = vol.ijk_to_ras
    new = np.eye(4)
    # new voxel (i', j', k') = (j_old, k_flipped, i_old)
    new[:3, 0] = old[:3, 1]
    new[:3, 1] = -old[:3, 2]
    new[:3, 2] = old[:3, 0]
    new[:3, 3] = old[:3, 3] + old[:3, 2] * (n_k - 1)
    rvol = CTVolume(perm_arr, new, source=vol.source, modality="CT", series_uid=uid)
    rfs = synthetic_findings(SHAPE)
    for f in rfs:
        f.mask = np.ascontiguousarray(f.mask[::-1].transpose(2, 0, 1))
    res = export_all(rvol, rfs, tmp_path / "out", model=MODEL_INFO, formats=("dicom_seg",))
    seg = hd.seg.segread(str(res.files["segmentation.dcm"]))
    srcs = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()),
                  key=lambda d: float(d.ImagePositionPatient[2]))
    refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {d.SOPInstanceUID for d in srcs}
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in srcs],
        segment_numbers=list(seg.segment_numbers), combine_segments=False,
        assert_missing_frames_are_empty=True)
    for n, f in enumerate(fs):
        np.testing.assert_array_equal(px[..., n], f.mask, err_msg=f.prompt)


def test_frame_samplers_agree(dicom_case):
    """The vectorised series sampler and the per-instance sampler give identical frames."""
    import pydicom

    from ctlanguage.exports.dicom_seg import _SeriesSampler, _frame_sampler

    folder, _, vol = dicom_case
    dss = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    inv = np.linalg.inv(vol.ijk_to_ras)
    mask = synthetic_findings(SHAPE)[1].mask
    fast = _SeriesSampler(dss, inv, SHAPE)
    assert fast.fast is not None
    slow = np.stack([_frame_sampler(ds, inv, SHAPE)(mask) for ds in dss])
    np.testing.assert_array_equal(fast(mask), slow)


def test_dicom_seg_without_overlaps_and_with_empty_segments(tmp_path, dicom_case):
    import highdicom as hd

    folder, uid, vol = dicom_case
    fs = [f for f in synthetic_findings(SHAPE) if f.prompt in ("liver", "left lung", "fluid around the right lung")]
    res = export_all(vol, fs, tmp_path / "out", model=MODEL_INFO, formats=("dicom_seg",))
    seg = hd.seg.segread(str(res.files["segmentation.dcm"]))
    assert seg.number_of_segments == 3
    v = seg.get_volume(combine_segments=False)
    assert v.array[..., 0].sum() == fs[0].mask.sum() and v.array[..., 1].sum() == fs[1].mask.sum()
    assert v.array[..., 2].sum() == 0
    lung = seg.get_segment_description(2)
    mods = lung.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
    assert "left" in lung.segmented_property_type.meaning.lower() or (mods and mods[0].CodeValue == "7771000")

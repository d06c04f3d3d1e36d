"""Anonymised DICOM (Study/Series/Frame of Reference UIDs blanked or removed): every export is
still written; the DICOM SEG gets fresh UIDs with a warning, or is skipped with a warning saying
why — never a failed run (issue 13, section 2)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pydicom
import pytest

import _fake_engine
from _dicom_helpers import legacy_converted, tilted_series
from _export_helpers import MODEL_INFO, synthetic_findings, synthetic_volume
from ctlanguage.cli import main
from ctlanguage.dicom_write import write_dicom_series
from ctlanguage.exports import export_all
from ctlanguage.io import read_ct

SHAPE = (24, 40, 48)
ALL = ["findings.csv", "findings.json", "masks", "report.html", "segmentation.dcm", "segmentation.seg.nrrd"]


def _anonymised(folder, keywords, how="removed"):
    write_dicom_series(synthetic_volume(SHAPE), folder)
    for p in sorted(folder.iterdir()):
        ds = pydicom.dcmread(p)
        for kw in keywords:
            if how == "removed":
                delattr(ds, kw)
            else:
                setattr(ds, kw, "")
        ds.save_as(p)
    return folder


def _seg_matches_masks(seg_path, folder, findings):
    import highdicom as hd

    seg = hd.seg.segread(str(seg_path))
    srcs = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()),
                  key=lambda d: int(d.InstanceNumber))
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in srcs], segment_numbers=list(seg.segment_numbers),
        combine_segments=False, assert_missing_frames_are_empty=True)
    for n, f in enumerate(findings):
        np.testing.assert_array_equal(px[..., n], f.mask, err_msg=f.prompt)
    return seg


@pytest.mark.parametrize("how", ["removed", "blank"])
def test_series_without_uids_gets_a_seg_with_fresh_uids_and_a_warning(tmp_path, how, caplog):
    folder = _anonymised(tmp_path / "s", ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"), how)
    vol = read_ct(folder)
    fs = synthetic_findings(SHAPE)
    with caplog.at_level(logging.WARNING):
        res = export_all(vol, fs, tmp_path / "out", model=MODEL_INFO)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ALL
    assert len(res.warnings) == 1
    for needle in ("Study Instance UID", "Series Instance UID", "Frame of Reference UID", "fresh UIDs"):
        assert needle in res.warnings[0]
    assert res.warnings[0] in caplog.text
    doc = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert doc["warnings"] == res.warnings and doc["input"]["series_uid"] is None
    seg = _seg_matches_masks(tmp_path / "out" / "segmentation.dcm", folder, fs)
    assert seg.StudyInstanceUID and seg.FrameOfReferenceUID
    for p in folder.iterdir():  # the source files are never touched
        assert not str(pydicom.dcmread(p, stop_before_pixels=True).get("StudyInstanceUID", ""))


def test_series_without_frame_of_reference_only(tmp_path):
    folder = _anonymised(tmp_path / "s", ("FrameOfReferenceUID",))
    vol = read_ct(folder)
    fs = synthetic_findings(SHAPE)
    res = export_all(vol, fs, tmp_path / "out", model=MODEL_INFO)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ALL
    assert len(res.warnings) == 1 and "no Frame of Reference UID" in res.warnings[0]
    seg = _seg_matches_masks(tmp_path / "out" / "segmentation.dcm", folder, fs)
    assert seg.StudyInstanceUID == vol.study_uid


def test_complete_series_has_no_warning(tmp_path):
    folder = tmp_path / "s"
    uid = write_dicom_series(synthetic_volume(SHAPE), folder)
    res = export_all(read_ct(folder), synthetic_findings(SHAPE), tmp_path / "out", model=MODEL_INFO)
    assert res.warnings == [] and "warnings" not in json.loads((tmp_path / "out" / "findings.json").read_text())
    import highdicom as hd

    assert hd.seg.segread(str(res.files["segmentation.dcm"])).ReferencedSeriesSequence[0].SeriesInstanceUID == uid


def test_seg_that_cannot_be_made_is_skipped_with_the_reason(tmp_path, caplog):
    folder = tmp_path / "s"
    write_dicom_series(synthetic_volume(SHAPE), folder)
    vol = read_ct(folder)
    for p in folder.iterdir():  # the source is gone by export time (moved, or a read-only share unmounted)
        p.unlink()
    with caplog.at_level(logging.WARNING):
        res = export_all(vol, synthetic_findings(SHAPE), tmp_path / "out", model=MODEL_INFO)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [n for n in ALL if n != "segmentation.dcm"]
    assert len(res.warnings) == 1 and res.warnings[0].startswith("segmentation.dcm not written: the source file")
    assert "can no longer be read" in res.warnings[0] and res.warnings[0] in caplog.text
    assert json.loads((tmp_path / "out" / "findings.json").read_text())["warnings"] == res.warnings


def test_query_on_anonymised_series_succeeds_with_a_warning(tmp_path, monkeypatch, capsys, caplog):
    _fake_engine.install(monkeypatch)
    model = _fake_engine.make_fake_model_dir(tmp_path / "fake-model")
    folder = _anonymised(tmp_path / "s", ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID"))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):  # the CLI's logging handler prints these as "WARNING: ..."
        code = main(["query", str(folder), "-p", "liver", "-p", "kidney stone", "--out", str(out),
                     "--model", str(model)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ALL
    assert "fresh UIDs" in caplog.text and "Traceback" not in err


def test_seg_of_a_gantry_tilted_series_lands_on_the_acquired_pixels(tmp_path):
    """The masks live on the resampled orthogonal grid; the SEG frames are the tilted source
    instances, each pixel taking the mask value of the nearest resampled voxel."""
    import highdicom as hd

    from ctlanguage.exports import ExportFinding
    from ctlanguage.volume import LPS_TO_RAS

    truth, _ = tilted_series(tmp_path / "s", deg=15.0)
    vol = read_ct(tmp_path / "s")
    mask = np.zeros(vol.shape, np.uint8)
    mask[2:8, 6:18, 4:15] = 1
    res = export_all(vol, [ExportFinding("liver", mask, anatomy="liver")], tmp_path / "out", model=MODEL_INFO)
    assert res.warnings == []  # the SEG itself needed no fallback; the resampling is on record:
    notes = json.loads((tmp_path / "out" / "findings.json").read_text())["warnings"]
    assert len(notes) == 1 and "gantry tilt (15.0 degrees): resampled onto an orthogonal grid" in notes[0]
    seg = hd.seg.segread(str(res.files["segmentation.dcm"]))
    srcs = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "s").iterdir()),
                  key=lambda d: int(d.InstanceNumber))
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in srcs], segment_numbers=[1],
        combine_segments=False, assert_missing_frames_are_empty=True)[..., 0]
    k, r, c = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in px.shape], indexing="ij")
    lps = np.stack([c, r, k], -1) @ truth[:3, :3].T + truth[:3, 3]  # acquired pixel centres
    ijk = vol.ras_to_ijk_points(lps.reshape(-1, 3) @ LPS_TO_RAS[:3, :3]).reshape(lps.shape)
    idx = np.rint(ijk).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(vol.shape[::-1])), axis=-1)
    expected = np.zeros(px.shape, np.uint8)
    expected[ok] = mask[idx[..., 2][ok], idx[..., 1][ok], idx[..., 0][ok]]
    assert expected.sum() > 500
    np.testing.assert_array_equal(px, expected)


def test_multiframe_source_gets_every_export_but_the_seg_with_a_warning(tmp_path):
    write_dicom_series(synthetic_volume(SHAPE), tmp_path / "classic")
    legacy_converted(tmp_path / "classic", tmp_path / "mf")
    vol = read_ct(tmp_path / "mf")
    res = export_all(vol, synthetic_findings(SHAPE), tmp_path / "out", model=MODEL_INFO)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [n for n in ALL if n != "segmentation.dcm"]
    assert len(res.warnings) == 1 and "multi-frame" in res.warnings[0]

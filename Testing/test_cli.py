"""`ctlanguage encode | query | batch | demo` — outputs, resumability, and every bad input ending
in one `error:` line, a non-zero exit and no partial files.

Most tests run the real CLI code and the real engine on a fake backend (Testing/_fake_engine.py),
so that they test the plumbing fast; `test_real_engine_*` run the embedded default model end to
end when it exists.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _fake_engine
from _export_helpers import synthetic_volume
from ctlanguage.cli import main

SHAPE = (24, 40, 48)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    _fake_engine.install(monkeypatch)
    model_dir = _fake_engine.make_fake_model_dir(tmp_path / "fake-model")
    return model_dir


@pytest.fixture(scope="module")
def nifti(tmp_path_factory):
    from ctlanguage.io import write_volume

    p = tmp_path_factory.mktemp("img") / "ct.nii.gz"
    write_volume(synthetic_volume(SHAPE), p)
    return p


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    from ctlanguage.dicom_write import write_dicom_series

    d = tmp_path_factory.mktemp("dcm") / "series"
    uid = write_dicom_series(synthetic_volume(SHAPE), d)
    return d, uid


def run(args, capsys):
    code = main(["--quiet", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *needles):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


# ------------------------------------------------------------------------------- happy paths

def test_query_nifti_writes_every_output(tmp_path, fake, nifti, capsys):
    from ctlanguage.io import read_ct

    out = tmp_path / "out"
    code, _, err = run(["query", str(nifti), "--prompt", "liver", "--prompt",
                        "liver lesion; fluid around the left lung", "--out", str(out),
                        "--model", str(fake), "--mask-threshold", "0.4"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".ctlanguage-files.json",
        "findings.csv", "findings.json", "masks", "report.html", "segmentation.seg.nrrd"]
    doc = json.loads((out / "findings.json").read_text())
    assert doc["model"]["id"] == "fake-model" and len(doc["model"]["sha256"]) == 64
    assert doc["input"]["path"] == str(nifti) and doc["input"]["shape"] == list(SHAPE)
    assert doc["mask_threshold"] == 0.4
    assert [f["prompt"] for f in doc["findings"]] == ["liver", "liver lesion", "fluid around the left lung"]
    src = read_ct(nifti)
    for f in doc["findings"]:
        m = read_ct(out / f["mask"], validate=False)
        assert m.array.shape == src.array.shape
        np.testing.assert_allclose(m.ijk_to_ras, src.ijk_to_ras, atol=1e-5)
    assert doc["findings"][2]["laterality"] == "left"


def test_query_dicom_writes_dicom_seg_referencing_series(tmp_path, fake, dicom_dir, capsys):
    import highdicom as hd

    folder, uid = dicom_dir
    out = tmp_path / "out"
    code, _, err = run(["query", str(folder), "-p", "liver", "-p", "kidney stone", "--out", str(out),
                        "--model", str(fake)], capsys)
    assert code == 0, err
    seg = hd.seg.segread(str(out / "segmentation.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == ["liver", "kidney stone"]
    doc = json.loads((out / "findings.json").read_text())
    assert doc["input"]["series_uid"] == uid


def test_encode_then_query_reuses_encoding(tmp_path, fake, nifti, capsys):
    enc = tmp_path / "ct.enc"
    code, _, err = run(["encode", str(nifti), "--out", str(enc), "--model", str(fake)], capsys)
    assert code == 0, err and enc.is_file()
    _fake_engine.FakeBackend.calls.clear()
    code, _, err = run(["query", str(nifti), "-p", "liver", "--encoding", str(enc), "--out",
                        str(tmp_path / "o"), "--model", str(fake)], capsys)
    assert code == 0, err
    assert "encode" not in _fake_engine.FakeBackend.calls


def test_quiet_success_prints_nothing(tmp_path, fake, nifti, capsys):
    code, out, err = run(["query", str(nifti), "-p", "liver", "--out", str(tmp_path / "o"),
                          "--model", str(fake)], capsys)
    assert code == 0 and out == "" and err == ""


def test_batch_resumable_and_failure_tolerant(tmp_path, fake, nifti, capsys):
    import shutil

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(nifti, cohort / "a.nii.gz")
    shutil.copy(nifti, cohort / "b.nii.gz")
    (cohort / "broken.nii.gz").write_bytes(b"not a nifti at all")
    out = tmp_path / "out"
    args = ["batch", str(cohort), "-p", "liver", "-p", "liver lesion", "--out", str(out), "--model", str(fake)]
    code, _, err = run(args, capsys)
    assert code == 1 and "1 of 3 cases failed" in err
    rows = {r["case_id"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "ok"
    assert rows["broken"]["status"] == "failed" and rows["broken"]["error"]
    assert "p:liver lesion" in rows["a"]
    assert (out / "a" / "findings.json").is_file() and not (out / "broken").exists()
    # resume: finished cases are skipped, the broken one is retried
    _fake_engine.FakeBackend.calls.clear()
    (cohort / "broken.nii.gz").unlink()
    shutil.copy(nifti, cohort / "broken.nii.gz")
    code, _, err = run(args, capsys)
    assert code == 0, err
    rows = {r["case_id"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert [rows[c]["status"] for c in ("a", "b", "broken")] == ["skipped", "skipped", "ok"]
    assert _fake_engine.FakeBackend.calls.count("encode") == 1


def test_batch_folder_with_dicom_case(tmp_path, fake, nifti, dicom_dir, capsys):
    import shutil

    folder, uid = dicom_dir
    cohort = tmp_path / "cohort"
    shutil.copytree(folder, cohort / "patient_dicom")
    (cohort / "patient_nifti").mkdir()
    shutil.copy(nifti, cohort / "patient_nifti" / "ct.nii.gz")
    out = tmp_path / "out"
    code, _, err = run(["batch", str(cohort), "-p", "liver", "--out", str(out), "--model", str(fake)], capsys)
    assert code == 0, err
    assert (out / "patient_dicom" / "segmentation.dcm").is_file()
    assert not (out / "patient_nifti" / "segmentation.dcm").exists()
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["case_id"] for r in rows] == ["patient_dicom", "patient_nifti"]


def test_batch_manifest(tmp_path, fake, nifti, capsys):
    man = tmp_path / "manifest.jsonl"
    man.write_text(json.dumps({"case_id": "c1", "image": str(nifti)}) + "\n")
    code, _, err = run(["batch", str(man), "-p", "liver", "--out", str(tmp_path / "o"), "--model", str(fake)], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "c1" / "masks" / "liver.nii.gz").is_file()


def test_models_list_and_verify(capsys):
    code = main(["models", "list", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    entries = json.loads(out)
    assert entries[0]["embedded"] is True


# ------------------------------------------------------------------------------- prompts

def test_unknown_long_and_non_ascii_prompts_still_answer(tmp_path, fake, nifti, capsys):
    long_prompt = ("fluid around the left lung " * 400)[:10000]
    out = tmp_path / "o"
    code, _, err = run(["query", str(nifti), "-p", "florbix wuggle", "-p", long_prompt,
                        "-p", "épanchement pleural — 肺", "--out", str(out), "--model", str(fake)], capsys)
    assert code == 0, err
    doc = json.loads((out / "findings.json").read_text())
    assert len(doc["findings"]) == 3
    assert doc["findings"][0]["prompt_confidence"] < 0.5
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert all(len(m) < 80 for m in masks)


def test_empty_prompt_is_refused(tmp_path, fake, nifti, capsys):
    out = tmp_path / "o"
    code, _, err = run(["query", str(nifti), "-p", "  ;  ", "--out", str(out), "--model", str(fake)], capsys)
    assert_one_error_line(code, err, "prompt")
    assert not out.exists()


# ------------------------------------------------------------------------------- bad inputs

def test_folder_without_dicom(tmp_path, fake, capsys):
    d = tmp_path / "nodicom"
    d.mkdir()
    (d / "readme.txt").write_text("hello")
    out = tmp_path / "o"
    code, _, err = run(["query", str(d), "-p", "liver", "--out", str(out), "--model", str(fake)], capsys)
    assert_one_error_line(code, err, "dicom")
    assert not out.exists()


def test_mr_dicom_is_refused(tmp_path, fake, capsys):
    from ctlanguage.dicom_write import write_dicom_series

    d = tmp_path / "mr"
    vol = synthetic_volume(SHAPE)
    write_dicom_series(vol, d, modality="MR")
    out = tmp_path / "o"
    code, _, err = run(["query", str(d), "-p", "liver", "--out", str(out), "--model", str(fake)], capsys)
    assert_one_error_line(code, err, "MR")
    assert not out.exists()


def test_dicom_series_with_missing_slices(tmp_path, fake, capsys):
    from ctlanguage.dicom_write import write_dicom_series

    d = tmp_path / "gap"
    write_dicom_series(synthetic_volume(SHAPE), d)
    files = sorted(d.iterdir())
    files[len(files) // 2].unlink()
    out = tmp_path / "o"
    code, _, err = run(["query", str(d), "-p", "liver", "--out", str(out), "--model", str(fake)], capsys)
    assert_one_error_line(code, err, "slice")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "pickle", "missing"])
def test_corrupt_checkpoint(tmp_path, fake, nifti, capsys, damage):
    w = fake / "model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:20])
    elif damage == "flip":
        b = bytearray(w.read_bytes())
        b[-1] ^= 0xFF
        w.write_bytes(bytes(b))
    elif damage == "pickle":
        w.unlink()
        (fake / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    else:
        (fake / "config.json").unlink()
    code, _, err = run(["models", "verify", str(fake)], capsys)
    assert code == 2 and "error:" in err and "Traceback" not in err
    out = tmp_path / "o"
    code, _, err = run(["query", str(nifti), "-p", "liver", "--out", str(out), "--model", str(fake)], capsys)
    assert_one_error_line(code, err)
    assert not out.exists()


def test_encoding_from_another_volume(tmp_path, fake, nifti, capsys):
    from ctlanguage.io import write_volume

    other = tmp_path / "other.nii.gz"
    vol = synthetic_volume(SHAPE)
    vol.array[0, 0, 0] = 500.0
    write_volume(vol, other)
    enc = tmp_path / "other.enc"
    assert run(["encode", str(other), "--out", str(enc), "--model", str(fake)], capsys)[0] == 0
    out = tmp_path / "o"
    code, _, err = run(["query", str(nifti), "-p", "liver", "--encoding", str(enc), "--out", str(out),
                        "--model", str(fake)], capsys)
    assert_one_error_line(code, err, "volume")
    assert not out.exists()


def test_output_folder_not_writable(tmp_path, fake, nifti, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["query", str(nifti), "-p", "liver", "--out", str(blocker / "o"), "--model", str(fake)], capsys)
    assert_one_error_line(code, err, "not writable")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = run(["query", str(nifti), "-p", "liver", "--out", str(ro), "--model", str(fake)], capsys)
        assert_one_error_line(code, err, "not writable")
        ro.chmod(0o700)


def test_disk_full_during_export_leaves_nothing(tmp_path, fake, nifti, capsys, monkeypatch):
    import ctlanguage.exports.html_report as html_report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(html_report, "write_report", full)
    out = tmp_path / "o"
    code, _, err = run(["query", str(nifti), "-p", "liver", "--out", str(out), "--model", str(fake)], capsys)
    assert_one_error_line(code, err, "disk is full")
    assert not out.exists()


def test_unknown_model_id(tmp_path, nifti, capsys):
    code, _, err = run(["query", str(nifti), "-p", "liver", "--out", str(tmp_path / "o"),
                        "--model", "no-such-model"], capsys)
    assert_one_error_line(code, err, "unknown model")


def test_bad_input_subprocess_has_no_traceback(tmp_path):
    """The installed console command: one line on stderr, exit 2, nothing in DIR."""
    d = tmp_path / "empty"
    d.mkdir()
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "ctlanguage.cli", "query", str(d), "-p", "liver",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------- real engine

def _real_engine_available():
    try:
        import ctlanguage.engine  # noqa: F401
        from ctlanguage import catalog

        catalog.resolve_model("default")
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _real_engine_available(), reason="engine or embedded model not present yet")
def test_real_engine_demo_end_to_end(tmp_path, capsys):
    import highdicom as hd

    out = tmp_path / "demo"
    code = main(["--quiet", "demo", "--out", str(out), "--seed", "3",
                 "-p", "liver", "-p", "left lung", "-p", "liver lesion", "-p", "fluid around the right lung"])
    _, err = capsys.readouterr()
    assert code == 0, err
    res = out / "results"
    for name in ("findings.json", "findings.csv", "segmentation.seg.nrrd", "report.html", "segmentation.dcm"):
        assert (res / name).is_file(), name
    doc = json.loads((res / "findings.json").read_text())
    assert len(doc["findings"]) == 4
    assert doc["findings"][0]["anatomy"] == "liver"
    assert doc["findings"][0]["volume_ml"] >= 0.0  # (quality is tested in test_model_quality.py)
    from ctlanguage.io import read_ct

    src = read_ct(out / "case" / "dicom")
    m = read_ct(res / doc["findings"][0]["mask"], validate=False)
    assert m.array.shape == src.array.shape
    np.testing.assert_allclose(m.ijk_to_ras, src.ijk_to_ras, atol=1e-4)
    assert "Research use only" in (res / "report.html").read_text(encoding="utf-8")
    p = doc["findings"][2]["probability"]
    assert p is not None and 0.0 <= p <= 1.0
    seg = hd.seg.segread(str(res / "segmentation.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == doc["input"]["series_uid"]


# ------------------------------------------------------------------------------- real engine, random weights
# The real Engine on a tiny randomly initialised model: checks the CLI <-> engine contract
# (Finding attributes, Encoding save/load, model/volume checks) independently of training.

@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    pytest.importorskip("ctlanguage.engine")
    import torch

    from ctlanguage.model import GroundedCTModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(model_id="cli-random", encoder_channels=[8, 16, 24], dense_channels=16,
                      spec_params={"spacing_mm": 4.0})
    d = tmp_path_factory.mktemp("model") / "cli-random"
    GroundedCTModel(cfg).save_pretrained(d)
    return d


@pytest.mark.slow
def test_real_engine_query_dicom_encode_reuse_and_refusals(tmp_path, random_model, dicom_dir, nifti, capsys):
    import highdicom as hd

    folder, uid = dicom_dir
    out = tmp_path / "out"
    code, _, err = run(["query", str(folder), "-p", "liver; liver lesion", "-p", "fluid around the left lung",
                        "-p", "florbix", "--out", str(out), "--model", str(random_model), "--device", "cpu"], capsys)
    assert code == 0, err
    doc = json.loads((out / "findings.json").read_text())
    assert doc["model"]["id"] == "cli-random" and len(doc["model"]["sha256"]) == 64
    recs = doc["findings"]
    assert [r["prompt"] for r in recs] == ["liver", "liver lesion", "fluid around the left lung", "florbix"]
    assert recs[0]["anatomy"] == "liver" and recs[0]["probability"] is None
    assert recs[1]["finding"] == "liver_lesion" and 0.0 <= recs[1]["probability"] <= 1.0
    assert recs[2]["laterality"] == "left"
    assert recs[3]["prompt_confidence"] < recs[0]["prompt_confidence"]
    seg = hd.seg.segread(str(out / "segmentation.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    # encode once, query with the saved encoding
    enc = tmp_path / "ct.enc"
    code, _, err = run(["encode", str(folder), "--out", str(enc), "--model", str(random_model)], capsys)
    assert code == 0, err
    code, _, err = run(["query", str(folder), "-p", "liver", "--encoding", str(enc), "--out",
                        str(tmp_path / "o2"), "--model", str(random_model)], capsys)
    assert code == 0, err
    a = json.loads((tmp_path / "o2" / "findings.json").read_text())["findings"][0]
    assert a["volume_ml"] == pytest.approx(recs[0]["volume_ml"], rel=1e-6)
    # a file that is not an encoding: refused
    code, _, err = run(["query", str(folder), "-p", "liver", "--encoding", str(nifti), "--out",
                        str(tmp_path / "o4"), "--model", str(random_model)], capsys)
    assert_one_error_line(code, err)
    assert not (tmp_path / "o4").exists()
    # the same encoding against another volume: refused, nothing written
    code, _, err = run(["query", str(nifti), "-p", "liver", "--encoding", str(enc), "--out",
                        str(tmp_path / "o3"), "--model", str(random_model)], capsys)
    assert_one_error_line(code, err, "volume")
    assert not (tmp_path / "o3").exists()


@pytest.mark.slow
def test_real_engine_unknown_long_non_ascii_prompts(tmp_path, random_model, nifti, capsys):
    long_prompt = ("small nodule in the left lower lobe " * 300)[:10000]
    out = tmp_path / "o"
    code, _, err = run(["query", str(nifti), "-p", "zorbleflux quantum", "-p", long_prompt,
                        "-p", "épanchement pleural gauche — 肺", "--out", str(out),
                        "--model", str(random_model)], capsys)
    assert code == 0, err
    recs = json.loads((out / "findings.json").read_text())["findings"]
    assert len(recs) == 3
    assert recs[0]["prompt_confidence"] < 0.5  # unknown: answered, with low confidence
    assert recs[2]["prompt"] == "épanchement pleural gauche — 肺"
    assert all((out / r["mask"]).is_file() for r in recs)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "épanchement pleural gauche — 肺" in html


@pytest.mark.slow
def test_real_engine_encoding_from_another_model(tmp_path, random_model, nifti, capsys):
    import torch

    from ctlanguage.model import GroundedCTModel, ModelConfig

    torch.manual_seed(1)
    other = tmp_path / "other-model"
    GroundedCTModel(ModelConfig(model_id="cli-random-2", encoder_channels=[8, 16, 24], dense_channels=16,
                                spec_params={"spacing_mm": 4.0})).save_pretrained(other)
    enc = tmp_path / "ct.enc"
    assert run(["encode", str(nifti), "--out", str(enc), "--model", str(other)], capsys)[0] == 0
    out = tmp_path / "o"
    code, _, err = run(["query", str(nifti), "-p", "liver", "--encoding", str(enc), "--out", str(out),
                        "--model", str(random_model)], capsys)
    assert_one_error_line(code, err, "model")
    assert not out.exists()


@pytest.mark.slow
def test_real_engine_corrupt_checkpoint(tmp_path, random_model, nifti, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(random_model, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    code, _, err = run(["query", str(nifti), "-p", "liver", "--out", str(tmp_path / "o"), "--model", str(bad)], capsys)
    assert_one_error_line(code, err)
    assert not (tmp_path / "o").exists()


def test_cli_import_does_not_pull_the_web_demo_or_the_slicer_glue():
    """The engine's CLI points one way: `web` is registered by ctlanguage_web through an entry
    point, so importing or building the CLI never imports the glue or trame."""
    code = ("import sys, ctlanguage.cli as c; a = sorted(m for m in sys.modules if m.startswith("
            "('ctlanguage_web', 'CTLanguageLib', 'trame', 'slicer'))); c.build_parser(); "
            "b = sorted(m for m in sys.modules if m.startswith(('CTLanguageLib', 'trame', 'slicer', "
            "'ctlanguage_web.app', 'ctlanguage_web.session'))); print(a, b)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] []", r.stdout
    assert "web" in main.__globals__["build_parser"]()._subparsers._group_actions[0].choices


def test_table_marks_negation_absence_and_text_not_understood(tmp_path, fake, nifti, capsys):
    code = main(["query", str(nifti), "-p", "no liver lesion; left pleural effusion; xyzzy", "--out",
                 str(tmp_path / "o"), "--model", str(fake)])
    out, err = capsys.readouterr()
    assert code == 0, err
    words = " ".join(out.split())
    assert {"NO", "understood", "absent:"} <= set(out.split())   # cells fold at the terminal width
    assert "score absent (uncalibrated)" in words and "score present (uncalibrated)" in words
    assert "masks by fake-model" in words
    doc = json.loads((tmp_path / "o" / "findings.json").read_text())
    neg, pos, nonsense = doc["findings"]
    assert neg["negated"] and neg["score_label"].startswith("score absent")
    assert pos["mask_suppressed"] and pos["volume_ml"] == 0
    assert not nonsense["understood"] and nonsense["probability"] is None
    assert doc["research_use_only"] is True


def test_demo_never_replaces_a_case_folder_it_did_not_write(tmp_path, capsys):
    """`demo --out X` rewrites X/case on every run; a case folder with someone else's files is
    refused before anything is written or deleted."""
    out = tmp_path / "demo"
    theirs = out / "case" / "dicom" / "IM0001.dcm"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"not ours")
    code = main(["--quiet", "demo", "--out", str(out), "--seed", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "did not write" in err[0], err
    assert theirs.read_bytes() == b"not ours" and sorted(p.name for p in out.rglob("*")) == ["IM0001.dcm", "case", "dicom"]


def test_query_absent_masks_draws_the_mask_of_a_finding_judged_absent(tmp_path, fake, nifti):
    for flag, drawn in (([], False), (["--absent-masks"], True)):
        out = tmp_path / f"o{len(flag)}"
        assert main(["--quiet", "query", str(nifti), "-p", "left pleural effusion", "--out", str(out),
                     "--model", str(fake), *flag]) == 0
        doc = json.loads((out / "findings.json").read_text())
        (f,) = doc["findings"]
        assert doc["absent_masks"] is drawn and f["mask_suppressed"] is not drawn and (f["volume_ml"] > 0) is drawn

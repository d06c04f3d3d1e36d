"""`ctlanguage models list` shows every family and the composed pipeline with what they can do,
licence, size, device and on-disk status; a pipeline without its weights ends in one sentence."""

from __future__ import annotations

import json

import pytest

from ctlanguage.cli import main
from ctlanguage.model_choices import catalog_choices


@pytest.fixture
def no_totalseg_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "no-weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts-home"))
    monkeypatch.delenv("CTLANGUAGE_ALLOW_DOWNLOADS", raising=False)


def test_models_list_shows_backends_and_the_pipeline(capsys, no_totalseg_weights):
    assert main(["models", "list", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    pipe = rows["totalseg+grounded"]
    assert pipe["pipeline"] == {"anatomy": "totalseg", "masks": "ctlanguage-synth-v3",
                                "scores": "ctlanguage-synth-v3"}
    assert "scores (calibrated)" in pipe["capabilities"] and any(
        c.startswith("anatomy (1") for c in pipe["capabilities"])   # TotalSegmentator's 124 keys
    assert pipe["license"] and pipe["available"] is False and "TOTALSEG_WEIGHTS_PATH" in pipe["how_to_get"]
    for embedded in ("ctlanguage-synth-v3", "ctlanguage-synth-v2"):
        assert rows[embedded]["available"] and "synthetic" in rows[embedded]["notice"]
    assert rows["voxtell"]["device"] == "gpu-recommended" and "free-text masks" in rows["voxtell"]["capabilities"]
    assert main(["models", "list"]) == 0   # folded to the terminal width: check words, not cells
    table = capsys.readouterr().out
    for needle in ("totalseg+gr", "anatomy:", "runs on", "on disk", "TOTALSEG_WEIGHTS_PATH"):
        assert needle in table
    published = rows["totalseg+merlin+voxtell"]
    assert published["pipeline"] == {"anatomy": "totalseg", "masks": "voxtell", "scores": "merlin"}
    caps = published["capabilities"]
    assert "scores (uncalibrated)" in caps and "free-text masks" in caps and any(c.startswith("anatomy (1") for c in caps)
    assert "MIT" in published["license"] and "not stated" in published["license"]
    assert published["available"] is False


@pytest.mark.parametrize("pipeline", ["totalseg+grounded", "totalseg+merlin+voxtell"])
def test_pipeline_without_weights_ends_in_one_sentence(tmp_path, capsys, no_totalseg_weights, pipeline):
    from _export_helpers import synthetic_volume
    from ctlanguage.io import write_volume

    img = tmp_path / "ct.nii.gz"
    write_volume(synthetic_volume((12, 20, 24)), img)
    out = tmp_path / "out"
    code = main(["--quiet", "query", str(img), "-p", "left kidney", "--out", str(out),
                 "--model", pipeline])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "TOTALSEG_WEIGHTS_PATH" in err[0], err
    assert not out.exists()


def test_choices_are_one_model_for_cli_slicer_and_web():
    from CTLanguageLib import catalog_ui

    assert catalog_ui.entry_choice is catalog_choices.__globals__["entry_choice"]


def test_allow_download_flag_is_the_users_consent(monkeypatch):
    """--allow-download sets the consent every backend reads (CTLANGUAGE_ALLOW_DOWNLOADS)."""
    import os

    from ctlanguage.cli import build_parser

    monkeypatch.delenv("CTLANGUAGE_ALLOW_DOWNLOADS", raising=False)
    build_parser().parse_args(["query", "ct.nii.gz", "-p", "liver", "--out", "o"])
    assert "CTLANGUAGE_ALLOW_DOWNLOADS" not in os.environ
    monkeypatch.setenv("CTLANGUAGE_ALLOW_DOWNLOADS", "0")
    args = build_parser().parse_args(["query", "ct.nii.gz", "-p", "liver", "--out", "o", "--allow-download"])
    assert args.allow_download and os.environ["CTLANGUAGE_ALLOW_DOWNLOADS"] == "1"

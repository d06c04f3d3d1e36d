"""The TotalSegmentator backend around its child process: weights and consent, usage statistics
off, progress, Cancel, errors, label-map state and answers. The child is a stand-in here (fast);
test_totalseg_e2e.py runs the real TotalSegmentator."""

import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctlanguage import vocabulary as V
from ctlanguage.backends import backend_module
from ctlanguage.backends import totalsegmentator as TS
from ctlanguage.backends.totalseg_runner import write_config
from ctlanguage.catalog import find_entry, load_catalog
from ctlanguage.engine.protocol import Backend, Request
from ctlanguage.errors import CancelledError, CTLanguageError, InputError
from ctlanguage.volume import CTVolume

HERE = Path(__file__).resolve().parent
needs_ts = pytest.mark.skipif(not TS.installed(), reason="pip install 'ctlanguage[totalseg]'")


@pytest.fixture
def entry():
    e = find_entry("totalseg", load_catalog())
    assert e is not None and e.extra.get("backend", getattr(e, "backend", None)) == "totalsegmentator"
    return e


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CTLANGUAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    monkeypatch.delenv("CTLANGUAGE_ALLOW_DOWNLOADS", raising=False)
    return tmp_path


def _fake_weights(folder: Path, fast=True, roi=True):
    for name in TS.required_folders(fast, roi):
        (folder / name).mkdir(parents=True, exist_ok=True)


def _fake_child(tmp_path, monkeypatch, mode, labels=None, affine=None):
    wrapper = tmp_path / "fake-python"
    wrapper.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{HERE / '_fake_totalseg_child.py'}' \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CTLANGUAGE_PYTHON", str(wrapper))
    monkeypatch.setenv("FAKE_TS_MODE", mode)
    monkeypatch.setenv("FAKE_TS_PIDS", str(tmp_path / "pids"))
    monkeypatch.setenv("FAKE_TS_REQUESTS", str(tmp_path / "requests.jsonl"))
    if labels is not None:
        np.savez(tmp_path / "labels.npz", labels=labels, affine=affine)
        monkeypatch.setenv("FAKE_TS_LABELS", str(tmp_path / "labels.npz"))


def _volume(shape=(6, 8, 10)):
    aff = np.diag([-0.8, -0.8, 2.5, 1.0])
    aff[:3, 3] = [100.0, 80.0, -30.0]
    return CTVolume(np.random.default_rng(1).normal(0, 50, shape).round().astype(np.float32), aff)


def test_registered_with_its_extra():
    from ctlanguage.backends import EXTRAS, REGISTRY

    assert REGISTRY["totalsegmentator"] == "ctlanguage.backends.totalsegmentator"
    assert EXTRAS["totalsegmentator"] == "totalseg"
    assert backend_module("totalsegmentator") is TS


def test_catalog_entry(entry):
    assert entry.license == "Apache-2.0" and entry.extra["capabilities"] == ["anatomy"]
    assert 0.2e9 <= entry.size <= 0.3e9


def test_not_installed_is_one_sentence(entry, env, monkeypatch):
    monkeypatch.setattr(TS, "installed", lambda: False)
    with pytest.raises(InputError, match=r"pip install 'ctlanguage\[totalseg\]'"):
        TS.load(entry)
    caps = TS.describe(entry)
    assert not caps.weights_present and "pip install" in caps.weights_hint


@needs_ts
def test_offline_without_weights_says_how_to_get_them_and_writes_nothing(entry, env):
    with pytest.raises(InputError) as exc:
        TS.load(entry)
    msg = str(exc.value)
    assert msg.count(". ") == 0 and msg.endswith(".")          # one sentence
    assert "CTLANGUAGE_ALLOW_DOWNLOADS=1" in msg and "TOTALSEG_WEIGHTS_PATH" in msg
    assert str(env / "weights") in msg
    assert not (env / "weights").exists() and not (env / "cache").exists()
    caps = TS.describe(entry)
    assert caps.weights_present is False and caps.weights_hint == msg
    assert "vertebrae_T12" in caps.anatomy and "lung_left" in caps.anatomy
    assert "pericardium" not in caps.anatomy and "body" not in caps.anatomy


@needs_ts
def test_consent_or_a_named_folder_lets_it_load(entry, env, monkeypatch):
    monkeypatch.setenv("CTLANGUAGE_ALLOW_DOWNLOADS", "1")
    b = TS.load(entry, device="cpu")
    assert isinstance(b, Backend) and b.allow_download and b.fast
    monkeypatch.delenv("CTLANGUAGE_ALLOW_DOWNLOADS")
    other = env / "my-weights"
    _fake_weights(other, roi=False)
    b = TS.load(entry, device="cpu", weights_path=other)
    assert b.weights == other and not b.allow_download
    assert TS.describe(entry).weights_present is False        # the env folder is still empty
    # full resolution on a GPU, fast on the CPU
    assert TS.TotalSegmentatorBackend(entry, device="cuda", allow_download=True).fast is False


def test_our_config_turns_usage_statistics_off(tmp_path):
    home = tmp_path / "home"
    write_config(home)
    cfg = json.loads((home / "config.json").read_text())
    assert cfg["send_usage_stats"] is False and cfg["statistics_disclaimer_shown"] is True
    (home / "config.json").write_text(json.dumps({"send_usage_stats": True, "totalseg_id": "abc",
                                                  "prediction_counter": 7}))
    write_config(home)
    cfg = json.loads((home / "config.json").read_text())
    assert cfg == {"send_usage_stats": False, "totalseg_id": "abc", "prediction_counter": 7,
                   "statistics_disclaimer_shown": True}


@needs_ts
def test_encode_answer_restore_with_known_labels(entry, env, monkeypatch):
    _fake_weights(env / "weights")
    vol = _volume()
    ts = V.totalseg_classes()
    truth = np.zeros(vol.shape, np.uint8)
    truth[:, :4, :] = ts["kidney_left"]
    truth[:3, 4:, :5] = ts["vertebrae_T12"]
    truth[3:, 4:, :5] = ts["lung_upper_lobe_left"]
    truth[3:, 4:, 5:] = ts["lung_lower_lobe_left"]
    # the child hands back the same voxels stored in RAS order (i and j reversed)
    stored = truth[:, ::-1, ::-1]
    aff = vol.ijk_to_ras.copy()
    aff[:3, 0] *= -1
    aff[:3, 1] *= -1
    aff[:3, 3] = (vol.ijk_to_ras @ np.array([vol.shape[2] - 1, vol.shape[1] - 1, 0, 1]))[:3]
    _fake_child(env, monkeypatch, "labels", stored, aff)
    b = TS.load(entry, device="cpu")
    seen = []
    state = b.encode(vol, progress=lambda f, m: seen.append((f, m)))
    assert state.labels.dtype == np.uint8 and np.array_equal(state.labels, truth)
    assert seen and seen[-1][0] == 1.0 and all(0.0 <= f <= 1.0 for f, _ in seen)
    req = json.loads((env / "requests.jsonl").read_text().splitlines()[-1])
    assert req["fast"] is True and req["device"] == "cpu" and req["roi_subset"] is None
    assert req["weights"] == str(env / "weights") and req["allow_download"] is False
    assert req["home"] == str(env / "cache" / "totalsegmentator")
    assert not Path(req["input"]).exists()                      # our temp folder is gone

    def ask(*keys):
        t = time.perf_counter()
        a = b.answer(state, Request(text="x", kind="anatomy", anatomies=keys))
        assert time.perf_counter() - t < 0.5
        assert a.model == "totalseg" and a.mask.dtype == np.uint8 and a.mask.shape == vol.shape
        return a.mask

    assert np.array_equal(ask("kidney_left"), truth == ts["kidney_left"])
    assert np.array_equal(ask("lung_left"), np.isin(truth, [ts["lung_upper_lobe_left"],
                                                          ts["lung_lower_lobe_left"]]))
    assert np.array_equal(ask("spine"), truth == ts["vertebrae_T12"])
    assert ask("liver").sum() == 0
    with pytest.raises(InputError, match="does not segment 'Pericardium'"):
        ask("pericardium")
    with pytest.raises(InputError, match="anatomy only"):
        b.answer(state, Request(text="x", kind="finding", anatomies=("liver",), finding="liver_lesion"))
    # the state saves and restores without the child
    again = b.restore(json.loads(json.dumps(state.metadata())), dict(state.tensors()))
    assert np.array_equal(b.answer(again, Request(text="x", kind="anatomy",
                                                  anatomies=("lung_left",))).mask, ask("lung_left"))
    # few structures: roi_subset; answers outside it are refused
    state = b.encode(vol, structures=("kidney_left", "lung_left"))
    req = json.loads((env / "requests.jsonl").read_text().splitlines()[-1])
    assert req["roi_subset"] == ["kidney_left", "lung_upper_lobe_left", "lung_lower_lobe_left"]
    assert b.answer(state, Request(text="x", kind="anatomy", anatomies=("lung_left",))).mask.any()
    with pytest.raises(InputError, match="not segmented in this encoding"):
        b.answer(state, Request(text="x", kind="anatomy", anatomies=("liver",)))
    b.encode(vol, structures=("spine", "ribs"))                   # 50 classes: a full run
    assert json.loads((env / "requests.jsonl").read_text().splitlines()[-1])["roi_subset"] is None


@needs_ts
def test_roi_subset_is_skipped_without_the_crop_model(entry, env, monkeypatch):
    _fake_weights(env / "weights", roi=False)
    vol = _volume()
    _fake_child(env, monkeypatch, "labels", np.zeros(vol.shape, np.uint8), vol.ijk_to_ras)
    state = TS.load(entry, device="cpu").encode(vol, structures=("liver",))
    req = json.loads((env / "requests.jsonl").read_text().splitlines()[-1])
    assert req["roi_subset"] is None and len(state.computed) == 117


@needs_ts
def test_cancel_ends_the_child_and_its_workers(entry, env, monkeypatch):
    _fake_weights(env / "weights")
    _fake_child(env, monkeypatch, "hang")
    b = TS.load(entry, device="cpu")
    t0 = time.monotonic()
    pids = env / "pids"
    with pytest.raises(CancelledError):
        b.encode(_volume(), cancel=lambda: pids.exists() and time.monotonic() - t0 > 0.3)
    assert time.monotonic() - t0 < 10
    for pid in map(int, pids.read_text().split()):
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if Path(f"/proc/{pid}/status").is_file() and "zombie" in Path(f"/proc/{pid}/status").read_text():
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"process {pid} still runs after Cancel")


@needs_ts
@pytest.mark.parametrize("mode,error,match", [
    ("error", InputError, "ran out of memory"),
    ("crash", CTLanguageError, r"failed \(exit 1\): RuntimeError: boom in nnU-Net"),
])
def test_child_failures_become_one_clear_error(entry, env, monkeypatch, mode, error, match):
    _fake_weights(env / "weights")
    _fake_child(env, monkeypatch, mode)
    with pytest.raises(error, match=match):
        TS.load(entry, device="cpu").encode(_volume())


@needs_ts
@pytest.mark.slow
def test_conforms_to_the_contract_and_composes_with_the_grounded_model(entry, env, monkeypatch,
                                                                       one_torch_thread):
    from test_backend_contract import check_backend

    from ctlanguage.backends import grounded
    from ctlanguage.engine import Engine

    _fake_weights(env / "weights")
    arr = np.full((24, 40, 40), -1000.0, np.float32)
    arr[3:21, 6:34, 5:35] = 40.0
    arr[6:16, 10:30, 8:18] = -850.0
    vol = CTVolume(arr, np.diag([8.0, 8.0, 10.0, 1.0]))
    ts = V.totalseg_classes()
    labels = np.zeros(vol.shape, np.uint8)
    labels[6:16, 10:30, 8:13] = ts["lung_upper_lobe_left"]
    labels[6:16, 10:30, 13:18] = ts["lung_lower_lobe_left"]
    _fake_child(env, monkeypatch, "labels", labels, vol.ijk_to_ras)
    b = TS.load(entry, device="cpu")
    check_backend(b, vol)
    g = grounded.load(device="cpu")
    engine = Engine({"anatomy": b, "masks": g, "scores": g})
    enc = engine.encode(vol)
    lung, effusion = engine.query(enc, "left lung; left pleural effusion")
    assert lung.mask_model == "totalseg" and np.array_equal(lung.mask, (labels > 0).astype(np.uint8))
    assert effusion.mask_model == effusion.score_model == g.info.id


@needs_ts
def test_cli_without_weights_exits_2_with_the_sentence_and_writes_nothing(env, capsys):
    from ctlanguage.cli import main as cli
    from ctlanguage.io import write_volume

    vol = _volume((10, 12, 14))
    vol.array[:, :3] = -1000.0                                  # air: a plausible CT
    ct = write_volume(vol, env / "ct.nii.gz")
    out = env / "out"
    assert cli(["query", str(ct), "--model", "totalseg", "--prompt", "T12", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: TotalSegmentator's weights are not in") and "TOTALSEG_WEIGHTS_PATH" in err
    assert not out.exists() and not (env / "weights").exists()

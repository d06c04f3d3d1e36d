"""Issue 13 §3/§4 rows: bad values, broken text, the user's own files, full disks, killed runs,
output streams and file modes. Each test failed before its fix (see docs/robustness.md).

Stand-in engine (Testing/_fake_engine.py) for speed; killed-process cases run in a subprocess.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import _fake_engine
from _export_helpers import MODEL_INFO, synthetic_findings, synthetic_volume
from ctlanguage.cli import main
from ctlanguage.errors import PromptError

SHAPE = (24, 40, 48)
TESTING = str(Path(__file__).resolve().parent)
STAGING = ".ctlanguage-staging-"


@pytest.fixture
def fake(monkeypatch, tmp_path):
    _fake_engine.install(monkeypatch)
    return _fake_engine.make_fake_model_dir(tmp_path / "fake-model")


@pytest.fixture(scope="module")
def nifti(tmp_path_factory):
    from ctlanguage.io import write_volume

    p = tmp_path_factory.mktemp("img") / "ct.nii.gz"
    write_volume(synthetic_volume(SHAPE), p)
    return p


def one_error_line(code, err, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def query(args, capsys, quiet=True):
    code = main((["--quiet"] if quiet else []) + ["query", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------- values and text

@pytest.mark.parametrize("value", ["1.5", "nan", "0", "abc", "inf"])
def test_bad_mask_threshold_is_one_sentence(tmp_path, fake, nifti, capsys, value):
    out = tmp_path / "o"
    code, _, err = query([nifti, "-p", "liver", "--out", out, "--model", fake,
                          "--mask-threshold", value], capsys)
    line = one_error_line(code, err, "--mask-threshold", "between 0 and 1")
    assert "usage:" not in err and value in line
    assert not out.exists()


def test_non_utf8_prompt_in_argv(tmp_path, nifti):
    """A Latin-1 terminal sends 0xE4 for 'ä': one clear line, exit 2 (was a TypeError traceback)."""
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "ctlanguage.cli", "query", str(nifti), "-p",
                        b"Leberl\xe4sion", "--out", str(out)], capture_output=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    err = r.stderr.decode("utf-8", "replace")
    one_error_line(r.returncode, err, "not UTF-8", "0xE4")
    assert not out.exists()


def test_fuzzed_prompts_parse_or_raise_prompt_error():
    """The engine API: every string either parses or raises PromptError (lone surrogates too)."""
    import random

    from ctlanguage.prompts import parse_prompt, split_prompts

    rng = random.Random(13)
    alphabet = ["a", "e", " ", ";", "ä", "肺", "\x00", "\t", "\ud800", "\udce4", "\U0001F600",
                "\u200b", "?", "-", "liver", "no ", "left"]
    refused = 0
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        try:
            for part in split_prompts(text):
                parse_prompt(part)
        except PromptError:
            refused += 1
    assert 0 < refused < 300
    with pytest.raises(PromptError, match="lone surrogate"):
        parse_prompt("liver \ud800 lesion")


# ------------------------------------------------------------------------- the user's files

def test_previous_run_and_users_own_files(tmp_path, fake, nifti, capsys):
    out = tmp_path / "o"
    assert query([nifti, "-p", "liver", "--out", out, "--model", fake], capsys)[0] == 0
    first = sorted(p.name for p in (out / "masks").iterdir())
    (out / "masks" / "my_own.nii.gz").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine")
    assert query([nifti, "-p", "spleen", "--out", out, "--model", fake], capsys)[0] == 0
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert "my_own.nii.gz" in masks and (out / "masks" / "my_own.nii.gz").read_bytes() == b"mine"
    assert (out / "notes.txt").read_text() == "mine"
    assert not set(first) & set(masks)  # our earlier mask (another prompt) is gone
    doc = json.loads((out / "findings.json").read_text())
    assert [f["prompt"] for f in doc["findings"]] == ["spleen"]
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING)]


def test_users_file_with_an_export_name_is_never_overwritten(tmp_path, fake, nifti, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "findings.csv").write_text("the user's own table")
    code, _, err = query([nifti, "-p", "liver", "--out", out, "--model", fake], capsys)
    one_error_line(code, err, "not written by ctlanguage")
    assert "encode" not in _fake_engine.FakeBackend.calls  # said before the work, not after it
    assert sorted(p.name for p in out.iterdir()) == ["findings.csv"]
    assert (out / "findings.csv").read_text() == "the user's own table"


def test_disk_full_with_new_nested_out_leaves_nothing(tmp_path, fake, nifti, capsys, monkeypatch):
    import ctlanguage.exports.html_report as html_report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(html_report, "write_report", full)
    code, _, err = query([nifti, "-p", "liver", "--out", tmp_path / "a" / "b" / "c", "--model", fake],
                         capsys)
    one_error_line(code, err, "disk is full")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------- killed runs

_CHILD = """
import os, signal, sys, time
sys.path[:0] = [{testing!r}]
from _export_helpers import MODEL_INFO, synthetic_findings, synthetic_volume
from ctlanguage.exports import export_all
import ctlanguage.exports.html_report as html_report
mode, out = sys.argv[1], sys.argv[2]
if mode == "write":          # killed while the exports are being written
    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL); time.sleep(10)
    html_report.write_report = killed
elif mode == "move":         # killed while the results are moved over the previous ones
    real = os.replace
    def replace(src, dst):
        if "{staging}" in str(src) and os.path.basename(str(src)) == "findings.json":
            os.kill(os.getpid(), signal.SIGKILL); time.sleep(10)
        return real(src, dst)
    os.replace = replace
fs = synthetic_findings({shape!r})
for f in fs:
    f.prompt = "second " + f.prompt
export_all(synthetic_volume({shape!r}), fs, out, model=MODEL_INFO)
"""


def _run_child(mode: str, out: Path) -> subprocess.CompletedProcess:
    code = _CHILD.format(testing=TESTING, staging=STAGING, shape=SHAPE)
    return subprocess.run([sys.executable, "-c", code, mode, str(out)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


def _prompts(out: Path) -> list[str]:
    return [f["prompt"] for f in json.loads((out / "findings.json").read_text())["findings"]]


def test_sigkill_while_writing_then_next_run_cleans_up(tmp_path):
    from ctlanguage.exports import export_all

    out = tmp_path / "o"
    export_all(synthetic_volume(SHAPE), synthetic_findings(SHAPE), out, model=MODEL_INFO)
    before = _prompts(out)
    r = _run_child("write", out)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert [p for p in out.iterdir() if p.name.startswith(STAGING)]  # what a kill leaves
    assert _prompts(out) == before                                     # earlier results intact
    export_all(synthetic_volume(SHAPE), synthetic_findings(SHAPE)[:1], out, model=MODEL_INFO)
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING)]


def test_sigkill_while_moving_never_hides_previous_results(tmp_path):
    from ctlanguage.exports import export_all

    out = tmp_path / "o"
    export_all(synthetic_volume(SHAPE), synthetic_findings(SHAPE), out, model=MODEL_INFO)
    names = {"findings.csv", "findings.json", "report.html", "segmentation.seg.nrrd"}
    r = _run_child("move", out)
    assert r.returncode == -signal.SIGKILL, r.stderr
    # right after the kill every result file is in place (old or new), none only in staging
    assert names <= {p.name for p in out.iterdir()}
    assert _prompts(out)[0].startswith("liver") or _prompts(out)[0].startswith("second")
    from ctlanguage.exports.atomic import recover

    assert recover(out) == 1                 # the next run finishes the move
    assert _prompts(out)[0].startswith("second")
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING)]
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert masks and all(m.startswith("second") for m in masks), masks


def test_sigterm_during_export_cleans_up(tmp_path, nifti):
    out, model = tmp_path / "o", _fake_engine.make_fake_model_dir(tmp_path / "m")
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path[:0] = [{TESTING!r}]
        import _fake_engine
        class MP:
            def setitem(self, d, k, v): d[k] = v
        _fake_engine.install(MP())
        import ctlanguage.exports.html_report as html_report
        def term(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM); time.sleep(10)
        html_report.write_report = term
        from ctlanguage.cli import main
        sys.exit(main(["--quiet", "query", {str(nifti)!r}, "-p", "liver", "--out", {str(out)!r},
                       "--model", {str(model)!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stderr.strip() == "error: terminated (SIGTERM)"
    assert not out.exists()


# ------------------------------------------------------------------------- other commands

def test_phantom_out_is_a_file_error_comes_alone(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code = main(["phantom", "--n", "1", "--out", str(f)])
    out, err = capsys.readouterr()
    one_error_line(code, err, "not a folder")
    assert out == "" and f.read_text() == "x"


def test_models_verify_checks_what_loading_checks(tmp_path, capsys):
    import hashlib

    good = _fake_engine.make_fake_model_dir(tmp_path / "good")
    unknown = _fake_engine.make_fake_model_dir(tmp_path / "unknown-field")
    cfg = json.loads((unknown / "config.json").read_text()) | {"flux_capacitor": 1}
    (unknown / "config.json").write_text(json.dumps(cfg))
    (unknown / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((unknown / n).read_bytes()).hexdigest()}  {n}\n"
        for n in ("config.json", "model.safetensors")))
    nosums = _fake_engine.make_fake_model_dir(tmp_path / "no-sums")
    (nosums / "SHA256SUMS").unlink()
    code = main(["models", "verify", str(unknown), str(good), str(nosums)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out.count("ok ") == 1 and "good" in out
    errors = err.strip().splitlines()
    assert len(errors) == 2 and "unknown fields" in errors[0] and "SHA256SUMS" in errors[1], err


# ------------------------------------------------------------------------- output streams

def test_results_on_stdout_progress_on_stderr_and_json(tmp_path, fake, nifti, capsys):
    code, out, err = query([nifti, "-p", "liver; fluid around the left lung", "--out", tmp_path / "o",
                            "--model", fake], capsys, quiet=False)
    assert code == 0
    assert {"probability", "prompt", "confidence"} <= set(out.split())
    assert "probability" not in err and "exports written" in err
    code, out, err = query([nifti, "-p", "liver", "--out", tmp_path / "j", "--model", fake, "--json"],
                           capsys)
    assert code == 0 and err == ""
    assert json.loads(out) == json.loads((tmp_path / "j" / "findings.json").read_text())


def test_table_headers_are_whole_at_80_columns():
    from rich.console import Console

    from ctlanguage.cli.query import TABLE_COLUMNS, findings_table
    from ctlanguage.exports import ExportFinding

    fs = [ExportFinding(prompt="fluid collection around the left lower lobe of the lung, small",
                        mask=None, anatomy="left_lung", finding="pleural_effusion", laterality="left",
                        probability=0.42, prompt_confidence=0.9, volume_ml=123.4)] * 3
    buf = io.StringIO()
    Console(file=buf, width=80, force_terminal=False).print(
        findings_table(fs, None, extra={"phantom truth": ["present"] * 3}))
    text = buf.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert "…" not in text
    words = text.split()
    for header in [c for c, _ in TABLE_COLUMNS] + ["phantom truth"]:
        for w in header.split():
            assert w in words, (w, text)


# ------------------------------------------------------------------------- file modes

@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_files_get_the_usual_mode_under_umask_022(tmp_path, fake, nifti, capsys):
    from ctlanguage.exports.atomic import atomic_write_bytes
    from ctlanguage.io import atomic_write
    from ctlanguage.phantom.corpus import write_corpus

    import shutil

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(nifti, cohort / "case1.nii.gz")
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "enc.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
        atomic_write_bytes(tmp_path / "summary.csv", b"a,b\n")
        write_corpus(str(tmp_path / "ph"), 1, seed=1, montage=True)
        assert main(["--quiet", "batch", str(cohort), "-p", "liver", "--out", str(tmp_path / "b"),
                     "--model", str(fake)]) == 0
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*")
             if p.is_file() and not {"fake-model", "cohort"} & set(p.parts)]
    assert len(files) > 8
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes

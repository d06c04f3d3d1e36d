#!/usr/bin/env python
"""Bad-input battery: odd and hostile inputs through the real CLI and the embedded default model,
with the totals docs/robustness.md records.

    python benchmarks/robustness_battery.py [--json out.json] [--keep DIR]

Every case runs `ctlanguage ...` as a user would: in this process through ``ctlanguage.cli.main``
(the embedded model is loaded once and reused, which changes nothing but the time), or as a
separate console process where the case needs one (non-UTF-8 argv, signals). Each case says what
it expects; the outcome is classified as

* clear error  — the expected non-zero exit with exactly one ``error: ...`` line on stderr;
* ok           — the expected success;
* unclear      — the run failed (or succeeded where it should not) without a traceback, but not
                 with one clear line: a usage dump, a progress bar before the error, an ``ok``;
* traceback    — a Python traceback or an exception that escaped the command;
* partial      — the case left files it should not have (staging folders, half exports, parents);
* lost         — a file the user put there is gone or changed.

Target: 0 tracebacks, 0 partial, 0 lost. Cases can be added to CASES (one function each).
A full disk is simulated (ENOSPC from a writer); the machine's disk is not filled.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CTLanguage"))
STAGING = ".ctlanguage-staging-"


@dataclass
class Outcome:
    case: str
    expected: str                      # "error" or "ok"
    result: str = "unclear"            # "clear error" | "ok" | "unclear" | "traceback"
    partial: list = field(default_factory=list)
    lost: list = field(default_factory=list)
    detail: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------------------------------ helpers

class Work:
    def __init__(self, base: Path):
        self.base = base
        self.n = 0

    def dir(self, name: str) -> Path:
        self.n += 1
        d = self.base / f"{self.n:02d}-{name}"
        d.mkdir(parents=True)
        return d


def run_main(args: list[str]) -> tuple[int | str, str, str]:
    """``ctlanguage ARGS`` in this process; an escaping exception is reported as a traceback."""
    from ctlanguage.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: int | str = main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - that is what we count
            import traceback

            traceback.print_exc(file=err)
            code = f"exception {type(exc).__name__}"
    return code, out.getvalue(), err.getvalue()


def run_cli(args: list, env=None, **kw) -> subprocess.Popen:
    e = dict(os.environ, PYTHONPATH=str(ROOT / "CTLanguage"), HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "ctlanguage.cli", *args], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def classify(o: Outcome, code, err: str, expect_code: int | None = None) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if "Traceback" in err or isinstance(code, str):
        o.result, o.detail = "traceback", (lines[-1] if lines else str(code))
    elif o.expected == "ok":
        o.result = "ok" if code == 0 else "unclear"
        o.detail = "" if code == 0 else f"exit {code}: {lines[-1] if lines else ''}"
    elif len(lines) == 1 and lines[0].startswith("error: ") and code != 0 \
            and (expect_code is None or code == expect_code):
        o.result, o.detail = "clear error", lines[0]
    else:
        o.result, o.detail = "unclear", f"exit {code}; stderr: {' | '.join(lines)[:300]}"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def lost_files(before: dict[str, str], folder: Path) -> list[str]:
    now = snapshot(folder) if folder.exists() else {}
    return [k for k, h in before.items() if now.get(k) != h]


def staging_left(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(STAGING + "*")] if folder.exists() else []


def cached_engine_load():
    """Load the embedded model once for every in-process case."""
    from ctlanguage import engine as engine_mod

    original = engine_mod.Engine.load.__func__
    cache: dict = {}

    def load(cls, model=None, device=None, progress=None, **kw):
        key = (str(model), str(device), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = original(cls, model=model, device=device, progress=progress, **kw)
        elif progress:
            progress(1.0, "cached")
        return cache[key]

    engine_mod.Engine.load = classmethod(load)


# ------------------------------------------------------------------------------------ cases

def case_threshold(w: Work, ct: Path, value: str) -> Outcome:
    o = Outcome(f"--mask-threshold {value}", "error")
    out = w.dir("threshold") / "o"
    code, _, err = run_main(["query", str(ct), "-p", "liver", "--out", str(out), "--mask-threshold", value])
    classify(o, code, err, 2)
    if "usage:" in err:
        o.result = "unclear"
        o.detail = "argparse usage dump: " + err.strip().splitlines()[-1][:120]
    o.partial = [str(out)] if out.exists() else []
    return o


def case_non_utf8_argv(w: Work, ct: Path) -> Outcome:
    o = Outcome("prompt with a non-UTF-8 byte in argv (Latin-1 'Leberläsion')", "error")
    out = w.dir("nonutf8") / "o"
    p = run_cli(["query", str(ct), "-p", b"Leberl\xe4sion", "--out", str(out)])
    _, err = p.communicate(timeout=600)
    classify(o, p.returncode, err.decode("utf-8", "replace"), 2)
    o.partial = [str(out)] if out.exists() else []
    return o


def case_fuzzed_prompts(w: Work, ct: Path) -> Outcome:
    """200 fuzzed prompts through the engine API (Engine.query): answered or PromptError."""
    from ctlanguage.engine import Engine
    from ctlanguage.errors import PromptError
    from ctlanguage.io import read_ct

    o = Outcome("200 fuzzed prompts through the engine API (lone surrogates, NUL, emoji, ...)", "ok")
    engine = Engine.load(model="default", device="cpu")
    enc = engine.encode(read_ct(ct))
    rng = random.Random(13)
    alphabet = ["a", "e", "r", " ", ";", "ä", "肺", "\x00", "\t", "\n", "\ud800", "\udce4", "\U0001F600",
                "\u200b", "\u202e", "?", "-", "liver", "no ", "left ", "effusion", "%s", "{}", "\\"]
    bad, refused = [], 0
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        try:
            engine.query(enc, text, compute_masks=False)
        except PromptError:
            refused += 1
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{text!r}: {type(exc).__name__}")
    o.result = "traceback" if bad else "ok"
    o.detail = (f"{len(bad)} failed, e.g. {bad[0]}" if bad
                else f"200 prompts: {200 - refused} answered, {refused} refused with PromptError")
    return o


def case_user_files(w: Work, ct: Path) -> Outcome:
    o = Outcome("--out holds a previous run and the user's own files; new prompts", "ok")
    out = w.dir("userfiles") / "o"
    code, _, err = run_main(["--quiet", "query", str(ct), "-p", "liver", "--out", str(out)])
    (out / "masks" / "my_annotation.nii.gz").write_bytes(b"user's own mask")
    (out / "notes.txt").write_text("user's notes")
    before = {k: v for k, v in snapshot(out).items() if k in ("masks/my_annotation.nii.gz", "notes.txt")}
    code, _, err = run_main(["--quiet", "query", str(ct), "-p", "spleen; pleural effusion", "--out", str(out)])
    classify(o, code, err)
    o.lost = lost_files(before, out)
    o.partial = staging_left(out)
    masks = sorted(p.name for p in (out / "masks").iterdir())
    if any(m.startswith("liver") for m in masks):
        o.partial.append("masks/liver*: the previous run's mask for a prompt no longer asked")
    return o


def case_user_file_named_like_export(w: Work, ct: Path) -> Outcome:
    o = Outcome("--out holds the user's own findings.csv (no earlier run)", "error")
    out = w.dir("userfindings") / "o"
    out.mkdir()
    (out / "findings.csv").write_text("user's own table\n")
    before = snapshot(out)
    code, _, err = run_main(["--quiet", "query", str(ct), "-p", "liver", "--out", str(out)])
    classify(o, code, err, 2)
    o.lost = lost_files(before, out)
    o.partial = [k for k in snapshot(out) if k not in before] + staging_left(out)
    return o


def case_disk_full_nested(w: Work, ct: Path) -> Outcome:
    import ctlanguage.exports.html_report as html_report

    o = Outcome("disk full (simulated ENOSPC) with --out under new nested folders", "error")
    base = w.dir("diskfull")
    real = html_report.write_report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    html_report.write_report = full
    try:
        code, _, err = run_main(["--quiet", "query", str(ct), "-p", "liver", "--out", str(base / "a" / "b" / "c")])
    finally:
        html_report.write_report = real
    classify(o, code, err, 2)
    o.partial = [str(p.relative_to(base)) for p in base.iterdir()]
    return o


def _wait_for_staging(out: Path, proc: subprocess.Popen, timeout: float = 900) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if out.is_dir() and any(p.name.startswith(STAGING) for p in out.iterdir()):
            return True
        time.sleep(0.02)
    return False


def case_signal_during_export(w: Work, ct: Path, sig: int) -> Outcome:
    name = signal.Signals(sig).name
    o = Outcome(f"{name} while the exports are written (console process), then a new run", "error")
    d = w.dir(name.lower())
    out = d / "o"
    code0, _, err0 = run_main(["--quiet", "query", str(ct), "-p", "liver", "--out", str(out)])  # earlier results
    (out / "notes.txt").write_text("user's notes")
    before = snapshot(out)
    p = run_cli(["--quiet", "query", str(ct), "-p", "spleen; kidney stone", "--out", str(out)])
    if not _wait_for_staging(out, p):
        p.kill()
        p.communicate()
        o.detail = "the export never started"
        return o
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    err = err.decode("utf-8", "replace")
    if sig == signal.SIGTERM:
        classify(o, p.returncode, err, 128 + signal.SIGTERM)
        o.partial = staging_left(out)
    else:  # SIGKILL cannot be handled: the next run must clean up, nothing may be hidden meanwhile
        o.expected = "ok"
        hidden = lost_files(before, out)
        code, _, err2 = run_main(["--quiet", "query", str(ct), "-p", "spleen", "--out", str(out)])
        classify(o, code, err2)
        o.detail = (f"killed (exit {p.returncode}); previous results visible after the kill: "
                    f"{'yes' if not hidden else 'NO: ' + ', '.join(hidden)}; next run: {o.detail or 'ok'}")
        o.partial = staging_left(out) + [f"hidden after kill: {h}" for h in hidden]
    o.lost = [k for k in lost_files({"notes.txt": before["notes.txt"]}, out)]
    return o


_MOVE_CHILD = """
import os, signal, sys, time
sys.path[:0] = [{root!r}]
import numpy as np
from ctlanguage.exports import ExportFinding, export_all
from ctlanguage.io import read_ct
real = os.replace
def replace(src, dst):
    if "{staging}" in str(src) and os.path.basename(str(src)) == "findings.json":
        os.kill(os.getpid(), signal.SIGKILL); time.sleep(10)
    return real(src, dst)
os.replace = replace
vol = read_ct({ct!r})
m = np.zeros(vol.array.shape, np.uint8); m[5:9, 20:30, 20:30] = 1
export_all(vol, [ExportFinding(prompt="second run", mask=m, anatomy="liver", probability=0.5)],
           {out!r}, model={{"id": "battery", "version": "0", "sha256": None}})
"""


def case_sigkill_during_move(w: Work, ct: Path) -> Outcome:
    o = Outcome("SIGKILL while results are moved into place over a previous run", "ok")
    out = w.dir("sigkill-move") / "o"
    run_main(["--quiet", "query", str(ct), "-p", "liver", "--out", str(out)])
    before = snapshot(out)
    code = _MOVE_CHILD.format(root=str(ROOT / "CTLanguage"), staging=STAGING, ct=str(ct), out=str(out))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    visible = {k for k in before if not k.startswith(".")} <= set(snapshot(out))
    code2, _, err = run_main(["--quiet", "query", str(ct), "-p", "liver", "--out", str(out)])
    classify(o, code2, err)
    o.partial = staging_left(out) + ([] if visible else ["previous results hidden after the kill"])
    o.detail = f"child exit {p.returncode}; every earlier result visible after the kill: {visible}"
    return o


def case_phantom_out_is_file(w: Work, ct: Path) -> Outcome:
    o = Outcome("phantom --out is a file (no --quiet)", "error")
    f = w.dir("phantom") / "afile"
    f.write_text("x")
    code, out, err = run_main(["phantom", "--n", "1", "--out", str(f)])
    classify(o, code, err + out, 2)
    o.lost = [] if f.read_text() == "x" else [str(f)]
    return o


def case_models_verify(w: Work, ct: Path) -> Outcome:
    from ctlanguage import catalog

    o = Outcome("models verify over a good, an unknown-field and a no-SHA256SUMS model folder", "error")
    d = w.dir("verify")
    good = catalog.resolve_model("default")[0]
    folders = {}
    for name in ("good", "unknown-field", "no-sums"):
        folders[name] = d / name
        shutil.copytree(good, folders[name])
    cfg = json.loads((folders["unknown-field"] / "config.json").read_text()) | {"flux_capacitor": 1}
    (folders["unknown-field"] / "config.json").write_text(json.dumps(cfg))
    sums = "".join(f"{hashlib.sha256((folders['unknown-field'] / n).read_bytes()).hexdigest()}  {n}\n"
                   for n in ("config.json", "model.safetensors"))
    (folders["unknown-field"] / "SHA256SUMS").write_text(sums)
    (folders["no-sums"] / "SHA256SUMS").unlink()
    code, out, err = run_main(["models", "verify", *(str(p) for p in folders.values())])
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    oks = [ln for ln in out.splitlines() if ln.startswith("ok ")]
    if "Traceback" in err:
        o.result = "traceback"
    elif code == 2 and len(errors) == 2 and len(oks) == 1 and "good" in oks[0]:
        o.result = "clear error"
    o.detail = f"exit {code}; {len(oks)} ok, {len(errors)} errors: " + " | ".join(e[:90] for e in errors)
    return o


CASES = [
    lambda w, ct: case_threshold(w, ct, "1.5"),
    lambda w, ct: case_threshold(w, ct, "nan"),
    case_non_utf8_argv,
    case_fuzzed_prompts,
    case_user_files,
    case_user_file_named_like_export,
    case_disk_full_nested,
    lambda w, ct: case_signal_during_export(w, ct, signal.SIGTERM),
    lambda w, ct: case_signal_during_export(w, ct, signal.SIGKILL),
    case_sigkill_during_move,
    case_phantom_out_is_file,
    case_models_verify,
]


def make_ct(folder: Path) -> Path:
    from ctlanguage.cli.demo import _phantom_volume
    from ctlanguage.io import write_volume
    from ctlanguage.phantom import generate_case

    p = folder / "ct.nii.gz"
    write_volume(_phantom_volume(generate_case(7)), p)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the outcomes here")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ctl-battery-"))
    base.mkdir(parents=True, exist_ok=True)
    cached_engine_load()
    outcomes = []
    try:
        ct = make_ct(base)
        w = Work(base)
        for case in CASES:
            t0 = time.perf_counter()
            try:
                o = case(w, ct)
            except Exception as exc:  # noqa: BLE001 - the battery itself must report, not stop
                o = Outcome(getattr(case, "__name__", "case"), "?", "traceback",
                            detail=f"escaped into the battery: {type(exc).__name__}: {exc}"[:300])
            o.seconds = round(time.perf_counter() - t0, 1)
            outcomes.append(o)
            print(f"{o.result:12s} partial={len(o.partial)} lost={len(o.lost)}  {o.case}  [{o.detail[:140]}]",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    totals = {"cases": len(outcomes),
              "clear errors": sum(o.result == "clear error" for o in outcomes),
              "ok": sum(o.result == "ok" for o in outcomes),
              "unclear": sum(o.result == "unclear" for o in outcomes),
              "tracebacks": sum(o.result == "traceback" for o in outcomes),
              "partial files": sum(bool(o.partial) for o in outcomes),
              "lost user files": sum(len(o.lost) for o in outcomes)}
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": totals, "cases": [asdict(o) for o in outcomes]},
                                              indent=2, ensure_ascii=False) + "\n")
    bad = ("unclear", "tracebacks", "partial files", "lost user files")
    return 0 if not any(totals[k] for k in bad) else 1


if __name__ == "__main__":
    sys.exit(main())

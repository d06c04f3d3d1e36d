#!/usr/bin/env python
"""Where a CLI query's time goes: model load, engine per prompt, each export per prompt, DICOM SEG.

    python benchmarks/bench_exports.py [--model default] [--shape 300 512 512] [--repeat 3]
                                       [--cli-repeat 5] [--skip-cli] [--json out.json]

Same volume as bench_engine.py (phantom seed 4242 resampled onto 512 x 512 x 300), written once
as NIfTI and once as a DICOM series. Measured, each in fresh processes where it matters:

* cold ``Engine.load`` (import included) with an empty per-user cache, and which heavy packages
  it imported;
* the engine's own time per prompt (``Engine.query``, 8 prompts, median of ``--repeat``);
* every export for 1 prompt and for 8 prompts; "per extra prompt" = (t8 - t1) / 7, median of
  ``--repeat`` runs each;
* DICOM SEG for 1 and for 8 segments on the DICOM-read volume (source series loaded by the
  writer, as in the CLI), and every export with the SEG for 1 and for 8 prompts;
* the real CLI: ``ctlanguage query --encoding`` with 1 and with 8 prompts, raw NRRD input (no
  SEG) and DICOM input (with SEG); per extra prompt = (t8 - t1) / 7, medians of ``--cli-repeat``.

Benchmarks are scripts, not timed unit tests: the numbers depend on the machine and its load
(the load average is printed with the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["liver", "lungs", "spleen", "left kidney", "aorta", "liver lesion",
           "fluid around the right lung", "heart"]
FORMATS = ("masks", "json", "csv", "seg_nrrd", "html")
HERE = Path(__file__).resolve().parent
TARGETS = {"load": 3.0, "per_prompt": 0.150, "seg8": 3.0}


def _median_time(fn, repeat: int) -> float:
    return _median_times(fn, repeat)[0]


def _median_times(fn, repeat: int) -> tuple[float, float]:
    """(wall, CPU) medians in seconds; CPU time (all threads of this process) is what the work
    costs, wall time what a user waits on a machine shared with other jobs."""
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------------ load

LOAD_CODE = """
import json, sys, time
t, c = time.perf_counter(), time.process_time()
from ctlanguage.engine import Engine
e = Engine.load(sys.argv[1], device="cpu")
dt, dc = time.perf_counter() - t, time.process_time() - c
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"monai", "transformers", "scipy"})
print("RESULT " + json.dumps({"load_s": dt, "load_cpu_s": dc, "imported": heavy}))
"""


def measure_load(model: str, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, CTLANGUAGE_CACHE=cache)
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", LOAD_CODE, model], capture_output=True,
                                 text=True, env=env, check=True).stdout
            wall = time.perf_counter() - t
        r = json.loads(out.split("RESULT ", 1)[1])
        r["process_s"] = wall
        runs.append(r)
    return {"load_s": statistics.median(r["load_s"] for r in runs),
            "load_cpu_s": statistics.median(r["load_cpu_s"] for r in runs),
            "process_s": statistics.median(r["process_s"] for r in runs),
            "all_load_s": [round(r["load_s"], 2) for r in runs], "imported": runs[-1]["imported"]}


# ------------------------------------------------------------------------------------ child

def child(args) -> None:
    """Fresh process: engine per prompt and every export, on the NIfTI and the DICOM volume."""
    import numpy as np
    import torch

    from ctlanguage.engine import Engine
    from ctlanguage.exports import export_all
    from ctlanguage.io import read_ct

    torch.set_num_threads(1)
    out: dict = {}
    engine = Engine.load(args.model, device="cpu")
    vol = read_ct(args.nifti)
    enc = engine.encode(vol)
    findings = []
    per_prompt = []
    first = []
    for p in PROMPTS:
        first.append(_median_times(lambda: engine.query(enc, p), 1))  # first query of the text
        per_prompt.append(_median_times(lambda: engine.query(enc, p), args.repeat))
        findings += engine.query(enc, p)
    out["engine_per_prompt_s"] = statistics.median(w for w, _ in per_prompt)
    out["engine_per_prompt_cpu_s"] = statistics.median(c for _, c in per_prompt)
    out["engine_per_prompt_max_s"] = max(w for w, _ in per_prompt)
    out["engine_first_query_s"] = statistics.median(w for w, _ in first[1:])   # not the very first
    out["engine_first_query_cpu_s"] = statistics.median(c for _, c in first[1:])
    out["mask_voxels"] = {f.prompt: int(np.count_nonzero(f.mask)) for f in findings}
    model = engine.describe()
    info = {"id": model["id"], "version": model["version"], "sha256": model["sha256"]}
    with tempfile.TemporaryDirectory() as tmp:
        n = [0]

        def run(fs, formats, volume=vol):
            n[0] += 1
            export_all(volume, fs, Path(tmp) / f"o{n[0]}", model=info, formats=formats)

        def split(fs_one, fs_all, formats, volume=vol):
            # 1 and 8 prompts alternate, so that both see the same load of a shared machine
            one, eight = [], []
            for _ in range(args.repeat):
                one.append(_median_times(lambda: run(fs_one, formats, volume), 1))
                eight.append(_median_times(lambda: run(fs_all, formats, volume), 1))
            (t1, c1), (t8, c8) = ((statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
                                  for r in (one, eight))
            return {"one_s": t1, "eight_s": t8, "per_extra_s": (t8 - t1) / 7,
                    "one_cpu_s": c1, "eight_cpu_s": c8, "per_extra_cpu_s": (c8 - c1) / 7}

        run(findings[:1], FORMATS)           # warm-up: first-use imports are not per prompt
        out["exports"] = {fmt: split(findings[:1], findings, FORMATS if fmt == "all" else (fmt,))
                          for fmt in FORMATS + ("all",)}
        dvol = read_ct(args.dicom)
        if dvol.array.shape != vol.array.shape or not np.allclose(dvol.ijk_to_ras, vol.ijk_to_ras,
                                                                  atol=1e-3):
            raise SystemExit("the DICOM series does not have the NIfTI volume's grid")
        t = time.perf_counter()
        run(findings[:1], ("dicom_seg",), dvol)  # first SEG of a process: highdicom loads its tables
        out["dicom_seg_first_s"] = time.perf_counter() - t
        out["dicom_seg"] = split(findings[:1], findings, ("dicom_seg",), dvol)
        # what a CLI query with DICOM input writes: every export, the SEG included
        out["exports_dicom"] = split(findings[:1], findings, FORMATS + ("dicom_seg",), dvol)
    print("RESULT " + json.dumps(out))


# ------------------------------------------------------------------------------------ CLI

def _cli(argv: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one CLI run in a fresh process."""
    code = "import sys; from ctlanguage.cli import main; sys.exit(main(sys.argv[1:]))"
    t, c = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True)
    return time.perf_counter() - t, _children_cpu() - c


def measure_cli(model: str, image: str, encoding: str, tmp: str, repeat: int) -> dict:
    def query(prompts):
        out = tempfile.mkdtemp(dir=tmp)
        args = ["--quiet", "query", image, "--encoding", encoding, "--model", model,
                "--device", "cpu", "--out", out]
        for p in prompts:
            args += ["-p", p]
        return _cli(args)

    one, eight = [], []
    for _ in range(repeat):   # alternating: both see the same load of a shared machine
        one.append(query(PROMPTS[:1]))
        eight.append(query(PROMPTS))
    t1, t8 = (statistics.median(w for w, _ in runs) for runs in (one, eight))
    c1, c8 = (statistics.median(c for _, c in runs) for runs in (one, eight))
    return {"one_s": t1, "eight_s": t8, "per_extra_s": (t8 - t1) / 7,
            "one_cpu_s": c1, "eight_cpu_s": c8, "per_extra_cpu_s": (c8 - c1) / 7}


# ------------------------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("K", "J", "I"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-cli", action="store_true", help="leave out the CLI subprocess runs")
    ap.add_argument("--cli-repeat", type=int, default=5, help="CLI runs per prompt count (median)")
    ap.add_argument("--json", help="also write the raw numbers to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nifti", help=argparse.SUPPRESS)
    ap.add_argument("--dicom", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, str(HERE))
    from bench_engine import cpu_model, make_volume

    from ctlanguage.dicom_write import write_dicom_series
    from ctlanguage.io import read_ct

    load0 = os.getloadavg()
    r: dict = {"load": measure_load(args.model, args.repeat)}
    with tempfile.TemporaryDirectory() as tmp:
        nifti = os.path.join(tmp, "chest.nii.gz")
        make_volume(args.shape, nifti)
        dicom = os.path.join(tmp, "dicom")
        write_dicom_series(read_ct(nifti), dicom)
        proc = subprocess.run([sys.executable, __file__, "--child", "--model", args.model,
                               "--nifti", nifti, "--dicom", dicom, "--repeat", str(args.repeat)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            return proc.returncode
        r.update(json.loads(proc.stdout.split("RESULT ", 1)[1]))
        if not args.skip_cli:
            # the CLI reads a raw NRRD (int16) here: reading and checking a 300 MB float .nii.gz
            # costs seconds per call, which only adds noise to the per-prompt difference
            import numpy as np
            import SimpleITK as sitk

            vol = read_ct(nifti)
            raw = os.path.join(tmp, "chest.nrrd")
            sitk.WriteImage(vol.to_sitk(np.round(vol.array).astype(np.int16)), raw, False)
            enc = os.path.join(tmp, "chest.ctlenc")
            _cli(["--quiet", "encode", raw, "--out", enc, "--model", args.model, "--device", "cpu"])
            r["cli_nifti"] = measure_cli(args.model, raw, enc, tmp, args.cli_repeat)
            enc_d = os.path.join(tmp, "dicom.ctlenc")
            _cli(["--quiet", "encode", dicom, "--out", enc_d, "--model", args.model, "--device", "cpu"])
            r["cli_dicom"] = measure_cli(args.model, dicom, enc_d, tmp, args.cli_repeat)
    load1 = os.getloadavg()
    r["machine"] = {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
                    "load_avg_before": [round(x, 2) for x in load0],
                    "load_avg_after": [round(x, 2) for x in load1]}
    report(r, args)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


def report(r: dict, args) -> None:
    m, ld = r["machine"], r["load"]
    ms = lambda s: f"{1000 * s:.0f} ms"  # noqa: E731

    def pair(row, key):  # "wall / CPU"
        return f"{ms(row[key])} / {ms(row[key.replace('_s', '_cpu_s')])}"

    print(f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}; load average "
          f"before/after {m['load_avg_before'][0]} / {m['load_avg_after'][0]}")
    print(f"Volume {args.shape} [k, j, i]; prompts: {', '.join(PROMPTS)}; medians of "
          f"{args.repeat}; times as wall / CPU (CPU: all threads of the process)\n")
    print("| step | measured (wall / CPU) | target |")
    print("|---|---|---|")
    print(f"| cold `Engine.load` (import + load, empty per-user cache) | **{ld['load_s']:.2f} s** / "
          f"{ld['load_cpu_s']:.2f} s (wall runs {ld['all_load_s']}; whole process "
          f"{ld['process_s']:.2f} s; heavy imports: {', '.join(ld['imported']) or 'none'}) | "
          f"≤ {TARGETS['load']:.0f} s |")
    print(f"| engine, per prompt (`Engine.query`, median over the 8) | "
          f"**{pair(r, 'engine_per_prompt_s')}** (slowest prompt {ms(r['engine_per_prompt_max_s'])} "
          f"wall); first query of a prompt text **{pair(r, 'engine_first_query_s')}** (median of "
          f"prompts 2-8, as in a CLI call) | – |")
    for fmt, row in r["exports"].items():
        name = "all exports but DICOM SEG" if fmt == "all" else f"export `{fmt}`"
        tgt = f"≤ {ms(TARGETS['per_prompt'])} with the engine" if fmt == "all" else "–"
        print(f"| {name}: per extra prompt [1 prompt; 8 prompts] | **{pair(row, 'per_extra_s')}** "
              f"[{pair(row, 'one_s')}; {pair(row, 'eight_s')}] | {tgt} |")
    d = r["dicom_seg"]
    print(f"| DICOM SEG, 8 segments [1 segment] | **{d['eight_s']:.2f} s / {d['eight_cpu_s']:.2f} s** "
          f"[{d['one_s']:.2f} s / {d['one_cpu_s']:.2f} s]; per extra segment {pair(d, 'per_extra_s')}; "
          f"the first SEG of a process adds highdicom's one-time setup (first 1-segment call "
          f"{r['dicom_seg_first_s']:.2f} s wall) | ≤ {TARGETS['seg8']:.0f} s |")
    if "exports_dicom" in r:
        e = r["exports_dicom"]
        print(f"| all exports with DICOM SEG (DICOM volume): per extra prompt [1; 8 prompts] | "
              f"**{pair(e, 'per_extra_s')}** [{pair(e, 'one_s')}; {pair(e, 'eight_s')}]; "
              f"+ engine first query = {ms(e['per_extra_s'] + r['engine_first_query_s'])} | "
              f"≤ {ms(TARGETS['per_prompt'])} with the engine |")
    for key, label in (("cli_nifti", "raw NRRD input, no SEG"), ("cli_dicom", "DICOM input, with SEG")):
        if key in r:
            c = r[key]
            print(f"| CLI `query --encoding`, {label}: per extra prompt [1; 8 prompts] | "
                  f"**{pair(c, 'per_extra_s')}** [{c['one_s']:.2f} s / {c['one_cpu_s']:.2f} s; "
                  f"{c['eight_s']:.2f} s / {c['eight_cpu_s']:.2f} s] | ≤ {ms(TARGETS['per_prompt'])} |")
    print("\nmask voxels: " + ", ".join(f"{k} {v:,}" for k, v in r["mask_voxels"].items()))


if __name__ == "__main__":
    sys.exit(main())

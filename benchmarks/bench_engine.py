#!/usr/bin/env python
"""Engine benchmark: encode time, peak RSS and per-prompt latency on a chest-sized CT.

    python benchmarks/bench_engine.py [--model default] [--shape 300 512 512] [--device cpu]
                                      [--repeat 7] [--json out.json]

The volume is a synthetic torso phantom (project tooling, seed 4242) resampled onto a
512 x 512 x 300 grid (about 0.8 x 0.8 x 1.3 mm), written to a temporary NIfTI file and encoded
in a fresh child process, so that the reported peak RSS is the engine's: model + text encoder +
the volume + preprocessing + encoding (the phantom generation is not counted).

Latencies are wall-clock medians over ``--repeat`` runs after encoding and include everything
``Engine.query`` does: parsing, the mask head on the stored features, restriction to the
anatomy, presence scoring and mapping the mask to the 512 x 512 x 300 source grid (uint8).
"first" is the first query of that prompt text on this encoding; "cached" the repeats.
Benchmarks are scripts, not timed unit tests: numbers depend on the machine and its load (the
load average is printed with the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    ("organ", "liver"),
    ("organ (both lungs)", "lungs"),
    ("large region", "body"),
    ("small finding", "left lung nodule"),
    ("finding", "liver lesion"),
    ("finding, lay words", "fluid around the right lung"),
    ("negated question", "no kidney stones?"),
    ("free text (embedding fallback)", "the big vessel leaving the heart"),
    ("three prompts", "liver; spleen; left kidney cyst"),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_volume(shape, path: str) -> dict:
    """Phantom (2 mm) resampled onto ``shape`` ([k, j, i]) covering the same field of view."""
    import numpy as np
    import SimpleITK as sitk

    from ctlanguage.phantom.corpus import generate_case
    from ctlanguage.volume import CTVolume, set_sitk_geometry

    case = generate_case(4242, spacing=(2.0, 2.0, 2.0), orient=False, fov="chest_abdomen",
                         findings=["lung_nodule", "liver_lesion", "pleural_effusion"])
    src = CTVolume(case.volume, case.ijk_to_ras)
    img = src.to_sitk()
    size_src = np.array(src.shape[::-1], float)
    spacing_src = src.spacing
    extent = size_src * spacing_src
    size = np.array(shape[::-1], float)
    spacing = extent / size
    spacing[:2] = max(spacing[0], spacing[1])       # square in-plane pixels, like a real scanner
    out = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    m = src.ijk_to_ras.copy()
    m[:3, :3] = src.direction * spacing
    # same centre as the phantom's field of view
    centre = src.ijk_to_ras_points((size_src - 1) / 2.0)[0]
    m[:3, 3] = centre - src.direction @ (spacing * (size - 1) / 2.0)
    set_sitk_geometry(out, m)
    res = sitk.Resample(img, out, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    sitk.WriteImage(res, path, False)
    return {"phantom_shape": list(src.shape), "spacing_mm": [round(float(s), 3) for s in spacing]}


def child(args) -> None:
    """Runs in a fresh process: load, read, encode, query; prints one JSON line."""
    import numpy as np
    import torch

    from ctlanguage.engine import Engine
    from ctlanguage.io import read_ct

    out = {"torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    engine = Engine.load(args.model, device=args.device)
    out["load_s"] = time.perf_counter() - t
    out["model"] = engine.describe()
    out["rss_after_load_mb"] = _rss_now_mb()
    vol = read_ct(args.child)
    out["shape"] = list(vol.array.shape)
    out["rss_with_volume_mb"] = _rss_now_mb()
    t = time.perf_counter()
    enc = engine.encode(vol)
    out["encode_s"] = time.perf_counter() - t
    out["encode_breakdown_s"] = {k: round(v, 3) for k, v in enc.timings.items()}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["model_grid"] = list(enc.part().model_grid.shape)
    out["feature_grid"] = list(enc.part().feature_grid.shape)
    out["encoding_mb"] = enc.nbytes() / 1e6
    t = time.perf_counter()
    engine.encode(vol)
    out["encode_cached_s"] = time.perf_counter() - t

    rows = []
    for label, text in PROMPTS:
        t = time.perf_counter()
        fs = engine.query(enc, text)
        first = time.perf_counter() - t
        times, parts = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fs = engine.query(enc, text)
            times.append(time.perf_counter() - t)
            parts.append(fs[0].timings)
        med = {k: statistics.median(p.get(k, 0.0) for p in parts) for k in ("heads", "to_source")}
        rows.append({"label": label, "prompt": text, "first_ms": 1000 * first,
                     "cached_ms": 1000 * statistics.median(times),
                     "cached_max_ms": 1000 * max(times),
                     "heads_ms": 1000 * med["heads"], "to_source_ms": 1000 * med["to_source"],
                     "mask_voxels": int(sum(int(np.count_nonzero(f.mask)) for f in fs)),
                     "n_prompts": len(fs)})
    out["prompts"] = rows
    (f,) = engine.query(enc, "liver")
    t = time.perf_counter()
    f.with_threshold(0.3)
    out["rethreshold_ms"] = 1000 * (time.perf_counter() - t)
    t = time.perf_counter()
    f.heatmap()
    out["heatmap_ms"] = 1000 * (time.perf_counter() - t)
    out["peak_rss_end_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(out))


def run_child(cmd, env=None):
    """Run a benchmark child process; its RESULT line as a dict (None after printing its output
    when it failed)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        return None
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _rss_now_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("K", "J", "I"))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", help="also write the raw numbers to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "chest.nii")
        t = time.perf_counter()
        geo = make_volume(args.shape, path)
        make_s = time.perf_counter() - t
        cmd = [sys.executable, __file__, "--child", path, "--model", args.model,
               "--device", args.device, "--repeat", str(args.repeat)]
        r = run_child(cmd)
        if r is None:
            return 1
    load1 = os.getloadavg()
    r.update(geo)
    r["machine"] = {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
                    "load_avg_before": [round(x, 2) for x in load0],
                    "load_avg_after": [round(x, 2) for x in load1]}
    r["volume_build_s"] = make_s

    m = r["machine"]
    print(f"Machine: {m['nproc']} CPUs ({m['cpu']}), torch threads {r['torch_threads']}, "
          f"device {args.device}; load average before/after {m['load_avg_before'][0]} / "
          f"{m['load_avg_after'][0]}")
    print(f"Model: {r['model']['id']} {r['model']['version']} (sha256 {r['model']['sha256'][:12]}…)")
    print(f"Volume: {r['shape']} voxels [k, j, i], spacing {r['spacing_mm']} mm (i, j, k); model grid "
          f"{r['model_grid']}, feature grid {r['feature_grid']}, encoding {r['encoding_mb']:.1f} MB\n")
    print("| step | value | budget |")
    print("|---|---|---|")
    b = r["encode_breakdown_s"]
    print(f"| model load (incl. text encoder) | {r['load_s']:.2f} s | – |")
    print(f"| encode 512x512x300 | {r['encode_s']:.2f} s (hash {b.get('hash', 0):.2f}, preprocess "
          f"{b.get('preprocess', 0):.2f}, image encoder {b.get('image_encoder', 0):.2f}, organs "
          f"{b.get('organs', 0):.2f}) | ≤ 10 s |")
    print(f"| encode again (cache hit) | {r['encode_cached_s']:.2f} s | – |")
    print(f"| peak RSS (load + volume + encode) | {r['peak_rss_mb']:.0f} MB | ≤ 3072 MB |")
    print(f"| RSS after load / with volume | {r['rss_after_load_mb']:.0f} / {r['rss_with_volume_mb']:.0f} MB | – |")
    print(f"| re-threshold a liver mask | {r['rethreshold_ms']:.1f} ms | – |")
    print(f"| liver heat map (float32, full grid, on demand) | {r['heatmap_ms']:.1f} ms | – |")
    print()
    print("| prompt kind | prompt | first (ms) | cached median (ms) | cached max (ms) | "
          "heads (ms) | to source grid (ms) | mask voxels |")
    print("|---|---|---|---|---|---|---|---|")
    for p in r["prompts"]:
        print(f"| {p['label']} | `{p['prompt']}` | {p['first_ms']:.1f} | {p['cached_ms']:.1f} | "
              f"{p['cached_max_ms']:.1f} | {p['heads_ms']:.1f} | {p['to_source_ms']:.1f} | "
              f"{p['mask_voxels']:,} |")
    print("\n(per-prompt budget ≤ 100 ms; 'three prompts' is one query of three prompts)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

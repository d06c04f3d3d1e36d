"""Cohort throughput: one process vs Ray with W workers, on N synthetic phantoms.

    python benchmarks/bench_batch.py [--n 8] [--workers 2] [--prompt "liver; pleural effusion"]

Prints a table (cases/minute, wall time, model loads) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prompt", default="liver; left pleural effusion; enlarged heart")
    ap.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 4.0])
    args = ap.parse_args()

    from ctlanguage.cli import main as cli
    from ctlanguage.phantom.corpus import write_corpus

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(str(tmp / "cohort"), args.n, seed=9500, spacing=args.spacing, montage=False)
        manifest = tmp / "cohort" / "manifest.jsonl"
        rows = []
        for label, extra in (("1 process", []),
                             (f"Ray, {args.workers} workers", ["--ray", "--workers", str(args.workers)])):
            t0 = time.perf_counter()
            code = cli(["--quiet", "batch", str(manifest), "-p", args.prompt, "--out",
                        str(tmp / label.replace(" ", "_").replace(",", "")), "--device", "cpu", *extra])
            dt = time.perf_counter() - t0
            rows.append((label, code, dt, 60.0 * args.n / dt))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.n} phantoms at {args.spacing} mm; prompts: {args.prompt}")
    print("| run | exit | wall (s) | cases/minute |")
    print("|---|---|---|---|")
    for label, code, dt, cpm in rows:
        print(f"| {label} | {code} | {dt:.1f} | {cpm:.2f} |")


if __name__ == "__main__":
    main()

"""Preprocessing speed and memory on a clinical-size CT grid.

Builds a synthetic 512x512x300 CT (0.7 x 0.7 x 1.0 mm, LPS-like axis flips, non-zero origin),
then times to_model_space and the model->source mappings that the engine uses:
thresholded masks (organ-sized and nodule-sized), a full-volume heat map and label maps.

    python benchmarks/bench_preprocess.py [--repeat 5] [--size 512 512 300]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

from ctlanguage.preprocess import ModelSpec, to_model_space
from ctlanguage.volume import CTVolume


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_ct(nx: int, ny: int, nz: int) -> CTVolume:
    """Elliptic torso of soft tissue with a spine-like bone rod, air around it."""
    aff = np.diag([-0.7, -0.7, 1.0, 1.0])
    aff[:3, 3] = (0.35 * nx, 0.35 * ny, -0.5 * nz)
    j, i = np.ogrid[:ny, :nx]
    body = ((i - nx / 2) / (0.4 * nx)) ** 2 + ((j - ny / 2) / (0.3 * ny)) ** 2 < 1
    bone = ((i - nx / 2) / 20.0) ** 2 + ((j - 0.7 * ny) / 20.0) ** 2 < 1
    sl = np.where(body, 40.0, -1000.0).astype(np.float32)
    sl[bone] = 700.0
    arr = np.repeat(sl[None], nz, axis=0)
    arr += np.random.default_rng(0).normal(0, 15, size=(1, ny, nx)).astype(np.float32)
    return CTVolume(arr, aff, source="synthetic")


def blob(grid, centre_ras, radii_mm) -> np.ndarray:
    """Smooth probability map on ``grid``: 1 inside an ellipsoid, ramping to 0 outside."""
    k, j, i = np.indices(grid.shape)
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    ras = ijk @ grid.ijk_to_ras[:3, :3].T + grid.ijk_to_ras[:3, 3]
    d = np.sqrt((((ras - centre_ras) / np.asarray(radii_mm)) ** 2).sum(-1))
    return np.clip(1.5 - d, 0.0, 1.0).astype(np.float32)


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times) * 1000.0, min(times) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=3, default=(512, 512, 300),
                    metavar=("NX", "NY", "NZ"))
    args = ap.parse_args()

    vol = synthetic_ct(*args.size)
    spec = ModelSpec()
    rows = []
    rss0 = rss_mb()
    model, med, best = timed(lambda: to_model_space(vol, spec), max(1, args.repeat // 2))
    rows.append(("to_model_space", med, best, f"model grid {model.array.shape}"))
    grid = model.grid
    centre = vol.ijk_to_ras_points([[s / 2 for s in vol.shape[::-1]]])[0]

    liver = blob(grid, centre + [-60, 0, 0], (75, 60, 60))
    mask, med, best = timed(lambda: grid.to_source(liver, vol, threshold=0.5), args.repeat)
    rows.append(("to_source thr, organ 15x12x12 cm", med, best, f"{int(mask.sum())} voxels"))

    nodule = blob(grid, centre + [40, 10, 5], (8, 8, 8))
    mask, med, best = timed(lambda: grid.to_source(nodule, vol, threshold=0.5), args.repeat)
    rows.append(("to_source thr, nodule 16 mm", med, best, f"{int(mask.sum())} voxels"))

    feat = grid.scaled(2)
    coarse = liver[::2, ::2, ::2].copy()
    mask, med, best = timed(lambda: feat.to_source(coarse, vol, threshold=0.5), args.repeat)
    rows.append(("to_source thr, organ from D/2 grid", med, best, f"{int(mask.sum())} voxels"))

    labels = (liver > 0.5).astype(np.uint8) + 2 * (nodule > 0.5).astype(np.uint8)
    out, med, best = timed(lambda: grid.to_source(labels, vol, mode="nearest"), args.repeat)
    rows.append(("to_source nearest label map", med, best, f"labels {np.unique(out).tolist()}"))

    src_labels = out
    back, med, best = timed(lambda: grid.labels_to_model(src_labels, vol), args.repeat)
    rows.append(("labels_to_model", med, best, f"{int((back > 0).sum())} model voxels"))

    heat, med, best = timed(lambda: grid.to_source(liver, vol), max(1, args.repeat // 2))
    rows.append(("to_source linear heat map (full)", med, best, f"{heat.dtype} {heat.shape}"))
    del heat

    # an oblique acquisition (10 degrees about S) takes the SimpleITK path
    t = np.radians(10.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    aff = vol.ijk_to_ras.copy()
    aff[:3, :3] = rot @ aff[:3, :3]
    oblique = CTVolume(vol.array, aff, source="synthetic oblique")
    omodel, med, best = timed(lambda: to_model_space(oblique, spec), 1)
    rows.append(("to_model_space, oblique source", med, best, f"model grid {omodel.array.shape}"))
    og = omodel.grid
    oliver = blob(og, centre + [-60, 0, 0], (75, 60, 60))
    mask, med, best = timed(lambda: og.to_source(oliver, oblique, threshold=0.5), args.repeat)
    rows.append(("to_source thr, organ, oblique source", med, best, f"{int(mask.sum())} voxels"))

    print(f"source grid {vol.shape} (k, j, i), spacing {vol.spacing.round(2).tolist()} mm; "
          f"model spacing {spec.spacing_mm} mm")
    print(f"{'operation':38s} {'median ms':>10s} {'best ms':>9s}  note")
    print("-" * 80)
    for name, med, best, note in rows:
        print(f"{name:38s} {med:10.1f} {best:9.1f}  {note}")
    print("-" * 80)
    organ_ms = rows[1][1]
    print(f"budget: organ mask onto the source grid <= 60 ms -> {organ_ms:.1f} ms "
          f"({'ok' if organ_ms <= 60 else 'OVER'})")
    print(f"peak RSS {rss_mb():.0f} MiB (volume alone {vol.array.nbytes / 2**20:.0f} MiB; "
          f"before preprocessing {rss0:.0f} MiB)")


if __name__ == "__main__":
    main()

"""Training-step time of the grounded model on this machine, by feature stride.

One synthetic phantom batch (``ctlanguage phantom`` cases on the 5 mm model grid, the shipped
models' settings), all default losses, forward + backward + AdamW step; the first step
(text-encoder warm-up) is not counted.

    python benchmarks/bench_train_step.py [--steps 3] [--threads 2] [--strides 2 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from ctlanguage.model import GroundedCTModel, ModelConfig
from ctlanguage.phantom import write_corpus
from ctlanguage.training.dataset import ManifestDataset, collate
from ctlanguage.training.train import TrainingObjective


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strides", type=int, nargs="+", default=[2, 1])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="ctl-bench-")
    write_corpus(tmp, n=2, seed=1000, montage=False)
    rows = []
    for stride in a.strides:
        torch.manual_seed(0)
        cfg = ModelConfig(spec_params={"spacing_mm": 5.0}, feature_stride=stride)
        ds = ManifestDataset(f"{tmp}/manifest.jsonl", cfg.spec, cfg.anatomies, augment=True,
                             feature_stride=stride)
        model = GroundedCTModel(cfg)
        objective = TrainingObjective(model, {})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for step in range(a.steps + 1):
            batch = collate([ds.sample(i, aug_seed=step * 10 + i) for i in range(2)])
            t = time.perf_counter()
            loss, _ = objective(batch, step_seed=step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step:
                times.append(time.perf_counter() - t)
        rows.append((stride, tuple(batch["image"].shape[2:]), statistics.median(times), min(times), max(times)))
    print(f"{'feature stride':>14} | {'model grid':>14} | {'median s/step':>13} | {'min':>6} | {'max':>6}")
    print("-" * 66)
    for stride, shape, med, lo, hi in rows:
        print(f"{stride:>14} | {'x'.join(map(str, shape)):>14} | {med:>13.2f} | {lo:>6.2f} | {hi:>6.2f}")
    print(f"(batch 2, {a.threads} torch threads, {a.steps} timed steps each)")


if __name__ == "__main__":
    main()

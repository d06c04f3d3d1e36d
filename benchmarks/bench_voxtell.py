#!/usr/bin/env python
"""VoxTell backend cost with a full-size network (random weights: the real ones cannot be
downloaded here): first load (sha256 + weights-only unpickling + safetensors conversion), later
load, encode and per-prompt time, sliding-window patches and peak RSS.

    python benchmarks/bench_voxtell.py [--shape 192 192 192] [--spacing 1 1 1] [--device cpu]
                                       [--blocks 1 3 4 6 6 6] [--threads 2] [--json out.json]

The network is VoxTellModel with the published sizes the predictor hard-codes (query dim 2048,
six transformer layers, text width 2560) on the stage layout its DECODER_CONFIGS assume
(features 32..320, patch 192^3). The residual block counts of voxtell_v1.1's plans are not
published outside the weights: ``--blocks`` defaults to nnU-Net's ResEnc-L counts (an
assumption, printed with the result). A 192^3 volume is one patch; a 512x512x300 CT at native
spacing is about 75 patches, so per-prompt time scales with ``patches`` x ``s_per_patch``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def plans(blocks) -> dict:
    feats, strides = [32, 64, 128, 256, 320, 320], [[1, 1, 1]] + [[2, 2, 2]] * 5
    return {"configurations": {"3d_fullres": {"patch_size": [192, 192, 192], "architecture": {
        "arch_kwargs": {
            "n_stages": 6, "features_per_stage": feats, "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 6, "strides": strides, "n_blocks_per_stage": list(blocks),
            "n_conv_per_stage_decoder": [1] * 5, "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[192, 192, 192], help="k j i voxels")
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="i j k mm")
    ap.add_argument("--blocks", type=int, nargs=6, default=[1, 3, 4, 6, 6, 6])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from ctlanguage.backends import voxtell, voxtell_weights as W
    from ctlanguage.engine.protocol import Request
    from ctlanguage.volume import CTVolume

    torch.set_num_threads(args.threads)
    out: dict = {"shape": args.shape, "spacing_mm": args.spacing, "blocks": args.blocks,
                 "blocks_note": "assumed (nnU-Net ResEnc-L counts)", "device": args.device,
                 "torch_threads": args.threads, "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CTLANGUAGE_CACHE"] = str(Path(tmp) / "cache")
        d = Path(tmp) / "voxtell_v1.1"
        (d / "fold_0").mkdir(parents=True)
        (d / "plans.json").write_text(json.dumps(plans(args.blocks)))
        net = W.build_network(plans(args.blocks))
        out["parameters_M"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 1)
        torch.save({"network_weights": net.state_dict()}, d / W.CHECKPOINT)
        del net
        out["checkpoint_GB"] = round((d / W.CHECKPOINT).stat().st_size / 1e9, 3)
        rng = np.random.default_rng(0)
        np.savez(d / "text_embeddings.npz", labels=np.array(["liver"]),
                 embeddings=rng.standard_normal((1, 2560)).astype(np.float16))
        for name in ("load_first_s", "load_again_s"):
            t = time.perf_counter()
            b = voxtell.load(None, device=args.device, model_dir=d)
            out[name] = round(time.perf_counter() - t, 2)
        arr = rng.normal(40, 20, args.shape).astype(np.float32)
        arr[:, :, :8] = -1000.0
        vol = CTVolume(arr, np.diag([*args.spacing, 1.0]))
        t = time.perf_counter()
        state = b.encode(vol)
        out["encode_s"] = round(time.perf_counter() - t, 2)
        out["patches"] = state.patches
        t = time.perf_counter()
        b.answer(state, Request(text="liver", kind="anatomy", anatomies=("liver",)))
        dt = time.perf_counter() - t
        out["prompt_s"] = round(dt, 2)
        out["s_per_patch"] = round(dt / state.patches, 2)
        out["peak_rss_MB"] = round(rss_mb())
        if args.device.startswith("cuda"):
            out["peak_gpu_MB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

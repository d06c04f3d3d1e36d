#!/usr/bin/env python
"""fVLM image path on CPU: preprocessing and the per-region ViT-B passes of one scan, peak RSS;
text cost per prompt pair.

    python benchmarks/bench_fvlm.py [--threads 2] [--json out.json]

fVLM's weights cannot be downloaded here: the network has the published sizes (3D ViT-B, 12
blocks, 768 wide; CXR-BERT-sized text encoder) with random weights, which costs the same compute.
Input: the seeded chest phantom of the tests (48 x 400 x 500 voxels, 0.875 x 0.875 x 2.5 mm) with
its four regions, so every region gets its window (lung 112 x 288 x 384, the others
112 x 288 x 352 voxels: 1,386-1,512 tokens each).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "Testing"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import _fvlm_helpers as H
    from ctlanguage.backends.fvlm import backend as B
    from ctlanguage.backends.fvlm import weights as W
    from ctlanguage.backends.fvlm.network import VIT_B, FVLMNet
    from ctlanguage.engine import ModelInfo
    from ctlanguage.volume import CTVolume

    text = dict(W.CXR_BERT, vocab_size=len(H.VOCAB))
    t = time.perf_counter()
    net = FVLMNet(VIT_B, text).eval()
    build = time.perf_counter() - t
    tok = W.load_tokenizer(H.write_vocab(__import__("pathlib").Path(os.environ.get("TMPDIR", "/tmp")) / "fvlm-bench-tok"))
    be = B.FVLMBackend(net, tok, ModelInfo(id="fvlm", sha256="0" * 64), "cpu")
    hu, affine, labels = H.phantom()
    volume = CTVolume(hu.astype(np.float32), affine)
    state = be.encode_regions(volume, H.regions(labels))
    t = time.perf_counter()
    be.text_embeddings(["Pleural effusion.", "Not Pleural effusion."])
    text_s = time.perf_counter() - t
    out = {"threads": args.threads, "build_s": round(build, 2),
           "preprocess_s": round(state.timings["preprocess"], 2),
           "image_encoder_s": round(state.timings["image_encoder"], 2),
           "regions": list(state.organs), "text_pair_s": round(text_s, 3),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "load_average": os.getloadavg()[0]}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

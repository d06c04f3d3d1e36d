#!/usr/bin/env python
"""Check the TotalSegmentator backend with the real weights on one CT (needs internet once, or
TOTALSEG_WEIGHTS_PATH pointing at downloaded weights):

    CTLANGUAGE_ALLOW_DOWNLOADS=1 python scripts/check_totalseg_real.py ct.nii.gz [--device gpu]

Runs the CTLanguage backend (child process, label map mapped onto the source grid) and
TotalSegmentator's own API on the same file in the same mode, compares the two label maps voxel
by voxel, and prints the organ volumes of a few prompts. Exit 0 when they agree on >= 99.9% of
voxels (they are the same model on the same voxels; the rest is resampling ties)."""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ct", help="CT volume (NIfTI, NRRD or a DICOM series folder)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    args = ap.parse_args()

    from ctlanguage.backends import totalsegmentator as TS
    from ctlanguage.catalog import find_entry, load_catalog
    from ctlanguage.engine.protocol import Request
    from ctlanguage.errors import CTLanguageError
    from ctlanguage.io import read_ct, write_volume
    from ctlanguage.prompts import parse_prompt

    try:
        volume = read_ct(args.ct)
        backend = TS.load(find_entry("totalseg", load_catalog()), device=args.device)
        ours = backend.encode(volume, progress=lambda f, m: print(f"\r{f:4.0%} {m}", end="", flush=True))
    except CTLanguageError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    print()
    os.environ["TOTALSEG_HOME_DIR"] = str(TS.home_dir())
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(backend.weights)
    from ctlanguage.backends.totalseg_runner import register_trainers

    register_trainers()
    from totalsegmentator.python_api import totalsegmentator

    with tempfile.TemporaryDirectory() as tmp:
        src = write_volume(volume, Path(tmp) / "ct.nii.gz")     # the same voxels it got from us
        img = totalsegmentator(str(src), None, ml=True, fast=backend.fast, device=args.device, quiet=True)
        ref = np.asarray(img.dataobj).astype(np.int32)           # [i, j, k] on the input grid
    theirs = TS.labels_onto_source(ref.T, img.affine, volume)
    agree = float(np.mean(theirs == ours.labels))
    print(f"voxel agreement with TotalSegmentator's own run: {agree:.4%}")
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    for text in ("liver", "spleen", "left kidney", "right kidney", "lungs", "aorta", "T12"):
        req = Request(text=text, kind="anatomy", anatomies=parse_prompt(text).anatomies)
        mask = backend.answer(ours, req).mask
        print(f"  {text:12s} {mask.sum() * voxel_ml:9.1f} ml")
    return 0 if agree >= 0.999 else 1


if __name__ == "__main__":   # nnU-Net starts worker processes: keep this guard
    sys.exit(main())

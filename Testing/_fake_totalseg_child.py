"""Stands in for the TotalSegmentator child process in fast unit tests of our process handling
(progress, cancel, errors, file hand-over); the real one runs in test_totalseg_e2e.py.
Behaviour from FAKE_TS_MODE: "labels" writes FAKE_TS_LABELS (an .npz with labels [k,j,i] and
affine) as the label map; "hang" starts a grandchild and waits; "error" / "crash" fail."""

import json
import os
import subprocess
import sys
import time

import numpy as np


def main():
    req = json.load(open(sys.argv[-1]))
    mode = os.environ["FAKE_TS_MODE"]
    print("PROGRESS", json.dumps([0.05, "Loading TotalSegmentator"]), flush=True)
    print("some TotalSegmentator chatter", flush=True)
    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.environ["FAKE_TS_PIDS"], "w").write(f"{os.getpid()} {child.pid}")
        while True:
            print("PROGRESS", json.dumps([0.2, "Running"]), flush=True)
            time.sleep(0.1)
    if mode == "error":
        print("ERROR", json.dumps(["TotalSegmentator ran out of memory; use the fast mode."]), flush=True)
        sys.exit(2)
    if mode == "crash":
        print("Traceback (most recent call last):\nRuntimeError: boom in nnU-Net", flush=True)
        sys.exit(1)
    import SimpleITK as sitk

    d = np.load(os.environ["FAKE_TS_LABELS"])
    img = sitk.GetImageFromArray(d["labels"])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ d["affine"]
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(sp.tolist())
    img.SetDirection((lps[:3, :3] / sp).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(img, req["output"])
    with open(os.environ["FAKE_TS_REQUESTS"], "a") as f:
        f.write(json.dumps(req) + "\n")
    print("PROGRESS", json.dumps([1.0, "TotalSegmentator finished"]), flush=True)


if __name__ == "__main__":
    main()

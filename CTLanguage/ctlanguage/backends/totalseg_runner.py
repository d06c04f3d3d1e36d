"""Child process that runs TotalSegmentator's Python API on one NIfTI file (as the Slicer
extension runs it: in a process of its own, so Cancel can end it and its memory goes with it).

    python -m ctlanguage.backends.totalseg_runner REQUEST.json

REQUEST.json: {"input", "output", "home", "weights", "fast", "roi_subset", "device",
"allow_download"}. Lines on stdout starting with ``PROGRESS`` (fraction, message) and ``ERROR``
(one sentence) are read by :mod:`ctlanguage.backends.totalsegmentator`; everything else is
TotalSegmentator's own output. Exit 0: the label map is at "output"; 2: a user-facing error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PROGRESS, ERROR = "PROGRESS", "ERROR"


def _say(tag: str, *parts) -> None:
    print(tag, json.dumps(list(parts)), flush=True)


def write_config(home: Path) -> None:
    """TotalSegmentator's config.json in our own home folder, usage statistics off (otherwise it
    creates one with them on and sends a request to its statistics server after predicting)."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "config.json"
    data = {}
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
    data.update({"send_usage_stats": False, "statistics_disclaimer_shown": True})
    data.setdefault("totalseg_id", "ctlanguage")
    data.setdefault("prediction_counter", 0)
    cfg.write_text(json.dumps(data, indent=1), encoding="utf-8")


def register_trainers() -> None:
    """Hand nnU-Net the two trainer classes the 'total' weights name, from their own modules.
    Otherwise it imports every trainer module to find them by name, which pulls timm and
    torchvision (slow, and fatal where torchvision does not match torch, e.g. a CPU torch)."""
    import totalsegmentator.nnunet as ts_nnunet
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring)
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring import (
        nnUNetTrainer_4000epochs_NoMirroring)

    for cls in (nnUNetTrainerNoMirroring, nnUNetTrainer_4000epochs_NoMirroring):
        ts_nnunet.custom_trainers.setdefault(cls.__name__, cls)


def run(req: dict) -> int:
    os.environ["TOTALSEG_HOME_DIR"] = req["home"]
    os.environ["TOTALSEG_WEIGHTS_PATH"] = req["weights"]
    write_config(Path(req["home"]))
    _say(PROGRESS, 0.05, "Loading TotalSegmentator")
    import totalsegmentator.libs as ts_libs

    def keep(path, *args, **kwargs):   # it deletes "old" weight folders in the weights folder
        print(f"ctlanguage: left {path} in place (not ours to delete)", flush=True)

    ts_libs.robust_rmtree = keep
    if not req.get("allow_download"):
        def no_download(url, *args, **kwargs):
            raise PermissionError(f"download of {url} not allowed")
        ts_libs.download_url_and_unpack = no_download
    register_trainers()
    from totalsegmentator.python_api import totalsegmentator

    what = "fast 3 mm" if req["fast"] else "full-resolution"
    _say(PROGRESS, 0.1, f"Running TotalSegmentator ({what}, {req['device']})")
    try:
        totalsegmentator(req["input"], req["output"], ml=True, fast=bool(req["fast"]),
                         roi_subset=req.get("roi_subset") or None, device=req["device"],
                         quiet=True, nr_thr_resamp=1, nr_thr_saving=1)
    except PermissionError as exc:
        _say(ERROR, f"TotalSegmentator needs weights that are not on this computer ({exc}).")
        return 2
    except MemoryError:
        _say(ERROR, "TotalSegmentator ran out of memory; use the fast mode or a smaller image.")
        return 2
    _say(PROGRESS, 1.0, "TotalSegmentator finished")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    req = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    return run(req)


if __name__ == "__main__":   # nnU-Net starts worker processes: keep this guard
    sys.exit(main())

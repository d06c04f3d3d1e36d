"""TotalSegmentator (``pip install 'ctlanguage[totalseg]'``) as an anatomy backend.

``encode`` runs TotalSegmentator's ``total`` task once per volume in a child process
(:mod:`.totalseg_runner`: progress lines, Cancel ends its process group), on the CPU in its fast
3 mm mode and at full resolution (1.5 mm) on a GPU, with ``roi_subset`` when the prompts need
only a few structures. The label map comes back exactly onto the source voxels (any axis order or
flip, checked on the affines; anything else is refused) and is the backend state, saved with
the encoding: every later anatomy prompt is a lookup (``answer`` -> a uint8 mask on the source
grid).

Weights are TotalSegmentator's own (Apache-2.0 for ``total``). They are looked for in the folder
the user names (``weights_path`` setting of the catalog entry, else ``TOTALSEG_WEIGHTS_PATH``),
else where TotalSegmentator keeps them (``$TOTALSEG_HOME_DIR/nnunet/results``, default
``~/.totalsegmentator/nnunet/results``); TotalSegmentator downloads missing ones only when the
user agreed (``allow_download``, or ``CTLANGUAGE_ALLOW_DOWNLOADS=1``). It runs with a home
folder of ours (``<ctlanguage cache>/totalsegmentator``) whose config.json turns its usage
statistics off.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import catalog
from .. import vocabulary as V
from ..engine.progress import report
from ..engine.protocol import Answer, Capabilities, ModelInfo
from ..errors import CancelledError, CTLanguageError, GeometryError, InputError

FAMILY = "totalsegmentator"
ALLOW_ENV = catalog.ALLOW_DOWNLOADS_ENV
WEIGHTS_ENV = "TOTALSEG_WEIGHTS_PATH"
ROI_MAX_CLASSES = 30          # prompts needing at most this many classes run with roi_subset
EXPECTED_S = {(True, "cpu"): 70.0, (False, "cpu"): 600.0, (True, "gpu"): 15.0, (False, "gpu"): 40.0}
GRID_TOL_MM = 1e-3            # voxel centres of the returned grid must match ours this closely
                              # (+1 % of it per voxel along an axis: float32 NIfTI affines)


# ------------------------------------------------------------------------------ settings

def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def downloads_allowed(setting=None) -> bool:
    """The user agreed that TotalSegmentator may download its weights."""
    return bool(setting) if setting is not None else _truthy(os.environ.get(ALLOW_ENV, ""))


def weights_dir(setting=None) -> Path:
    """Where TotalSegmentator's weights are (or will be downloaded to)."""
    if setting:
        return Path(setting).expanduser()
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    home = os.environ.get("TOTALSEG_HOME_DIR")
    if not home:   # TotalSegmentator's own default (it maps a root home to /tmp)
        home = Path("/tmp" if str(Path.home()) == "/" else Path.home()) / ".totalsegmentator"
    return Path(home) / "nnunet" / "results"


def home_dir() -> Path:
    """TotalSegmentator's home folder for our runs (its config.json; statistics off)."""
    from ..catalog import cache_dir

    return cache_dir() / "totalsegmentator"


def required_folders(fast: bool, roi: bool) -> list:
    """The weight folders TotalSegmentator 'total' needs in this mode (its own task table)."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    ids = TASK_CONFIGS["total"]["sub_modes"]["fast" if fast else "default"]["task_id"]
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    if roi:
        ids.append(298)   # the 6 mm model that finds the crop for roi_subset
    return [TASK_ID_WEIGHTS_CONFIGS[i]["foldername"] for i in ids]


def missing_weights(folder: Path, fast: bool, roi: bool = False) -> list:
    return [name for name in required_folders(fast, roi) if not (folder / name).is_dir()]


def weights_hint(folder: Path) -> str:
    return (f"TotalSegmentator's weights are not in {folder}: allow the one-time download "
            f"(about 0.25 GB from github.com/wasserth/TotalSegmentator; {ALLOW_ENV}=1 or the "
            f"download question), or set {WEIGHTS_ENV} to a folder that holds them.")


def installed() -> bool:
    return util.find_spec("totalsegmentator") is not None


def masked_keys() -> tuple:
    """Every vocabulary anatomy made entirely of TotalSegmentator classes."""
    classes = V.totalseg_classes()
    return tuple(k for k in V.all_anatomies() if set(V.components(k)) <= set(classes))


# ------------------------------------------------------------------------------ geometry

def grid_map(src_affine, src_shape, out_affine, out_shape):
    """How an image on grid ``out`` lies on grid ``src`` when both are the same voxels in another
    axis order / direction: (perm, flip) such that ``src[i] = out[o]`` with
    ``o[a] = i[perm[a]]`` or its flip. Shapes/affines in (i, j, k); None if not such a grid."""
    m = np.linalg.inv(np.asarray(out_affine, float)) @ np.asarray(src_affine, float)
    r, t = m[:3, :3], m[:3, 3]
    perm, flip = [], []
    for a in range(3):
        b = int(np.argmax(np.abs(r[a])))
        sign = r[a, b]
        if abs(abs(sign) - 1) > 1e-4 or np.sum(np.abs(r[a])) - abs(sign) > 1e-4:
            return None
        if out_shape[a] != src_shape[b]:
            return None
        want = 0.0 if sign > 0 else src_shape[b] - 1.0
        if abs(t[a] - want) > 1e-3:
            return None
        perm.append(b)
        flip.append(sign < 0)
    if sorted(perm) != [0, 1, 2]:
        return None
    # the match must hold in millimetres at the far corner too, not only in voxel units
    corner = np.array(src_shape, float) - 1
    o = np.array([(src_shape[perm[a]] - 1 - corner[perm[a]]) if flip[a] else corner[perm[a]]
                  for a in range(3)])
    far_src = np.asarray(src_affine, float) @ np.append(corner, 1)
    far_out = np.asarray(out_affine, float) @ np.append(o, 1)
    if np.max(np.abs(far_src - far_out)) > GRID_TOL_MM * (1.0 + 0.01 * float(np.max(src_shape))):
        return None
    return tuple(perm), tuple(flip)


def labels_onto_source(labels_kji: np.ndarray, labels_affine, volume) -> np.ndarray:
    """A label map (array [k, j, i], voxel->RAS ``labels_affine``) on the exact grid of
    ``volume``; GeometryError unless it covers the same voxels (axis order and flips may differ)."""
    out_shape = tuple(labels_kji.shape[::-1])
    src_shape = tuple(volume.shape[::-1])
    found = grid_map(volume.ijk_to_ras, src_shape, labels_affine, out_shape)
    if found is None:
        raise GeometryError(
            "TotalSegmentator returned its label map on a different voxel grid than the input "
            f"(shape {out_shape} vs {src_shape}); it was not used.")
    perm, flip = found
    arr = labels_kji.T                      # [i, j, k] of the returned grid
    for a in range(3):
        if flip[a]:
            arr = np.flip(arr, axis=a)
    axes = [perm.index(b) for b in range(3)]   # source axis b <- returned axis a
    return np.ascontiguousarray(np.transpose(arr, axes).T)


# ------------------------------------------------------------------------------ state

@dataclass
class LabelState:
    """TotalSegmentator's label map of one volume, on its source grid ([k, j, i])."""

    labels: np.ndarray
    classes: dict                      # label value -> class name
    computed: tuple                    # class names that were segmented (all, or the roi_subset)
    info: dict = field(default_factory=dict)

    def tensors(self):
        return {"labels": self.labels}

    def metadata(self) -> dict:
        return {"classes": {str(k): v for k, v in self.classes.items()},
                "computed": list(self.computed), "shape": list(self.labels.shape), **self.info}

    def nbytes(self) -> int:
        return int(self.labels.nbytes)


# ------------------------------------------------------------------------------ backend

class TotalSegmentatorBackend:
    def __init__(self, entry, device: Optional[str] = None, weights_path=None,
                 allow_download=None, fast: Optional[bool] = None):
        settings = dict(getattr(entry, "extra", {}) or {})
        self.entry = entry
        self.weights = weights_dir(weights_path or settings.get("weights_path"))
        self.allow_download = downloads_allowed(
            allow_download if allow_download is not None else settings.get("allow_download"))
        self.device = _device(device)
        self.fast = (self.device == "cpu") if fast is None else bool(fast)
        version = metadata.version("totalsegmentator")
        # identity of what produces the labels: package version, mode and weight files
        ident = [version, f"fast={self.fast}"] + [
            f"{n}:{_size(self.weights / n)}" for n in required_folders(self.fast, False)]
        self.info = ModelInfo(id=entry.id, version=f"{entry.version} (totalsegmentator {version})",
                              sha256=hashlib.sha256("|".join(ident).encode()).hexdigest(),
                              kind=FAMILY, license=entry.license, path=str(self.weights))
        self.capabilities = Capabilities(anatomy=masked_keys(),
                                         device="cpu", weights_present=True)
        self._check_weights(roi=False)

    def _check_weights(self, roi: bool) -> None:
        missing = missing_weights(self.weights, self.fast, roi)
        if missing and not self.allow_download:
            raise InputError(weights_hint(self.weights))

    # -- encode ---------------------------------------------------------------------------
    def classes_for(self, keys: Sequence[str]) -> list:
        ts = V.totalseg_classes()
        out = []
        for key in keys:
            comps = V.components(key)
            if not set(comps) <= set(ts):
                raise InputError(f"TotalSegmentator does not segment '{V.get(key).display}'.")
            out.extend(c for c in comps if c not in out)
        return out

    def encode(self, volume, progress=None, cancel=None, anatomy=None,
               structures: Optional[Sequence[str]] = None) -> LabelState:
        """Run TotalSegmentator on ``volume``; ``structures`` (anatomy keys the prompts need),
        when few, restrict the run with roi_subset."""
        from ..io import write_volume

        wanted = self.classes_for(structures) if structures else None
        roi = wanted if (wanted and len(wanted) <= ROI_MAX_CLASSES) else None
        if roi and missing_weights(self.weights, self.fast, True) and not self.allow_download:
            roi = None   # no crop model here: segment everything instead
        self._check_weights(roi=bool(roi))
        work = Path(tempfile.mkdtemp(prefix="ctlanguage-totalseg-"))
        try:
            src, out = work / "ct.nii.gz", work / "labels.nii.gz"
            write_volume(volume, src)
            req = {"input": str(src), "output": str(out), "home": str(home_dir()),
                   "weights": str(self.weights), "fast": self.fast, "roi_subset": roi,
                   "device": "gpu" if self.device == "gpu" else "cpu",
                   "allow_download": self.allow_download}
            (work / "request.json").write_text(json.dumps(req), encoding="utf-8")
            _run_child(work / "request.json", progress, cancel,
                       EXPECTED_S[(self.fast, self.device)])
            labels_kji, affine = _read_labels(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        labels = labels_onto_source(labels_kji, affine, volume)
        labels = labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16)
        from totalsegmentator.map_to_binary import class_map

        classes = {int(k): v for k, v in class_map["total"].items()}
        return LabelState(labels, classes, tuple(roi or classes.values()),
                          {"fast": self.fast, "device": self.device, "roi_subset": roi,
                           "model": self.info.id, "version": self.info.version})

    # -- answer ---------------------------------------------------------------------------
    def answer(self, state: LabelState, request):
        if request.kind != "anatomy":
            raise InputError("TotalSegmentator segments anatomy only; it gives no finding masks or scores.")
        names = self.classes_for(request.anatomies)
        skipped = [n for n in names if n not in state.computed]
        if skipped:
            raise InputError(f"'{skipped[0]}' was not segmented in this encoding (it was run for "
                             f"{len(state.computed)} structures only); encode the volume again.")
        by_name = {v: k for k, v in state.classes.items()}
        mask = np.isin(state.labels, [by_name[n] for n in names]).astype(np.uint8)
        return Answer(model=self.info.id, mask=mask, calibrated=False)

    def restore(self, metadata: dict, tensors) -> LabelState:
        labels = np.asarray(tensors["labels"])
        if list(labels.shape) != list(metadata["shape"]):
            raise InputError("The saved TotalSegmentator label map does not match its metadata.")
        info = {k: v for k, v in metadata.items() if k not in ("classes", "computed", "shape")}
        return LabelState(labels, {int(k): v for k, v in metadata["classes"].items()},
                          tuple(metadata["computed"]), info)


def _size(folder: Path) -> int:
    """Total bytes of the checkpoints below ``folder`` (0 when absent)."""
    return sum(p.stat().st_size for p in folder.rglob("*.pth")) if folder.is_dir() else 0


def _device(device: Optional[str]) -> str:
    d = (device or "auto").lower()
    if d in ("gpu", "cuda") or d.startswith("cuda:"):
        return "gpu"
    if d == "cpu":
        return "cpu"
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _python() -> str:
    """The interpreter for the child process (Slicer: PythonSlicer next to the application)."""
    env = os.environ.get("CTLANGUAGE_PYTHON")
    if env:
        return env
    exe = Path(sys.executable)
    if exe.name.lower().startswith("slicer"):
        found = shutil.which("PythonSlicer") or shutil.which("PythonSlicer", path=str(exe.parent))
        if found:
            return found
    return sys.executable


def _run_child(request: Path, progress, cancel, expected_s: float) -> None:
    """Run the runner on ``request``; report progress; end its process group on cancel."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    kw = {"start_new_session": True} if os.name == "posix" else {
        "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    proc = subprocess.Popen([_python(), "-m", "ctlanguage.backends.totalseg_runner", str(request)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, **kw)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(s) for s in proc.stdout], daemon=True)
    reader.start()
    t0, done, message, error, tail = time.monotonic(), 0.0, "Starting TotalSegmentator", None, []
    try:
        while True:
            while not lines.empty():
                line = lines.get_nowait().rstrip("\n")
                tag, _, rest = line.partition(" ")
                if tag in ("PROGRESS", "ERROR"):
                    vals = json.loads(rest)
                    if tag == "ERROR":
                        error = vals[0]
                    else:
                        done, message = float(vals[0]), vals[1]
                elif line.strip():
                    tail = (tail + [line])[-20:]
            if proc.poll() is not None and not reader.is_alive() and lines.empty():
                break
            if cancel is not None and cancel():
                _stop(proc)
                raise CancelledError("TotalSegmentator was cancelled.")
            if progress is not None:   # TotalSegmentator reports no progress: estimate by time
                elapsed = time.monotonic() - t0
                est = 0.1 + 0.85 * (1.0 - math.exp(-elapsed / expected_s))
                report(progress, max(done, est) if done < 1.0 else 1.0, f"{message} ({elapsed:.0f} s)")
            time.sleep(0.2)
    except BaseException:
        if proc.poll() is None:
            _stop(proc)
        raise
    if proc.returncode == 0:
        report(progress, 1.0, f"{message} ({time.monotonic() - t0:.0f} s)")
        return
    if error:
        raise InputError(error)
    last = next((s for s in reversed(tail) if s.strip()), "no output")
    raise CTLanguageError(f"TotalSegmentator failed (exit {proc.returncode}): {last.strip()}")


def _stop(proc: subprocess.Popen) -> None:
    """End the runner and the workers it started (its own process group)."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(timeout=5)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass
        proc.wait()


def _read_labels(path: Path):
    import SimpleITK as sitk

    from ..volume import sitk_ijk_to_ras

    if not path.is_file():
        raise CTLanguageError("TotalSegmentator finished without writing a label map.")
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), sitk_ijk_to_ras(img)


# ------------------------------------------------------------------------------ registry API

def describe(entry):
    """Capabilities without loading anything (model lists)."""
    settings = dict(getattr(entry, "extra", {}) or {})
    folder = weights_dir(settings.get("weights_path"))
    if not installed():
        return Capabilities(anatomy=masked_keys(), device="cpu", weights_present=False,
                            weights_hint="TotalSegmentator is not installed: pip install 'ctlanguage[totalseg]'.")
    present = not missing_weights(folder, fast=True)
    return Capabilities(anatomy=masked_keys(), device="cpu", weights_present=present,
                        weights_hint="" if present else weights_hint(folder), fetches_own_weights=True)


def load(entry, device=None, progress=None, **settings) -> TotalSegmentatorBackend:
    """The backend for a catalog entry; InputError (one sentence) when the package or its
    weights are missing and no download was allowed."""
    if not installed():
        raise InputError("The TotalSegmentator backend is not installed: pip install 'ctlanguage[totalseg]'.")
    report(progress, 0.0, "Checking TotalSegmentator weights")
    return TotalSegmentatorBackend(entry, device=device, **settings)

"""A fake BACKEND (``ctlanguage.engine.protocol.Backend`` + ``ConceptMatcher``) for the real
``ctlanguage.engine.Engine``: tests of the CLI, the Slicer glue and the web demo then run the
engine's own prompt splitting, parsing, scoring, source-grid mapping, caching and encoding files,
fast and independently of model quality.

Answers: masks are logits on a model grid of half the source resolution (a ``preprocess.ModelGrid``
with the source orientation; the engine maps and thresholds them like any model's): a smooth blob
per anatomy, placed from the anatomy key (asymmetric, so an axis flip anywhere would show), whose
size grows as the mask threshold drops.
Finding scores are fixed per finding key (``SCORES``, else 0.25), uncalibrated, with a zero-shot
decision point of 0.5 (below it a finding is judged absent and gets no mask by default). Text outside the
vocabulary goes to the nearest vocabulary phrase by string similarity (``nearest_phrase``).

``install(monkeypatch)`` makes the "grounded" family load this backend, so ``Engine.load(folder)``
on a folder from :func:`make_fake_model_dir` gives the real Engine around it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctlanguage import vocabulary
from ctlanguage.catalog import verify_model_dir
from ctlanguage.engine.protocol import Answer, Capabilities, ModelInfo, Request
from ctlanguage.errors import CancelledError, InputError
from ctlanguage.preprocess import ModelGrid

SCORES = {"liver_lesion": 0.83, "pleural_effusion": 0.21}
DEFAULT_SCORE = 0.25
DECISION_SCORE = 0.5   # its zero-shot rule: present above 0.5 (as fVLM's "X" vs "Not X" softmax)


@dataclass
class FakeState:
    """What the fake keeps from one volume: its model grid and a coarse intensity summary."""

    grid: ModelGrid
    mean_hu: np.ndarray                       # [1] float32
    timings: dict = field(default_factory=dict)

    def tensors(self) -> dict:
        return {"mean_hu": self.mean_hu}

    def metadata(self) -> dict:
        return {"grid": self.grid.to_dict()}

    def nbytes(self) -> int:
        return int(self.mean_hu.nbytes)


def blob_logit(grid: ModelGrid, key: str) -> np.ndarray:
    """float32 logits on ``grid``: 4 at the key's centre, falling off over ~1/5 of each axis."""
    digest = hashlib.sha256(key.encode()).digest()
    shape = np.asarray(grid.shape, dtype=np.float64)
    centre = (0.2 + 0.6 * np.frombuffer(digest[:3], dtype=np.uint8) / 255.0) * (shape - 1)
    radius = np.maximum(shape / 5.0, 1.0)
    axes = [((np.arange(n) - c) / r) ** 2 for n, c, r in zip(grid.shape, centre, radius)]
    axes = [a.astype(np.float32) for a in axes]
    r2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    return np.float32(4.0) - np.float32(4.0) * r2


def model_grid(shape, ijk_to_ras, stride: int = 2) -> ModelGrid:
    """Every ``stride``-th source voxel (same orientation and origin)."""
    affine = np.asarray(ijk_to_ras, dtype=np.float64).copy()
    affine[:3, :3] *= stride
    return ModelGrid(tuple(-(-int(n) // stride) for n in shape), affine)


class FakeBackend:
    calls: list = []   # "encode" per encode, ("answer", text) per answer: for tests

    def __init__(self, path=None, model_id: str = "fake-model"):
        """``path``: a folder from :func:`make_fake_model_dir` (verified like a real model folder)."""
        version, sha = "0.1", hashlib.sha256(model_id.encode()).hexdigest()
        if path is not None:
            sha = verify_model_dir(Path(path))["weights_sha256"]
            cfg = json.loads((Path(path) / "config.json").read_text())
            model_id, version = cfg.get("model_id", model_id), str(cfg.get("version", "0"))
        self.info = ModelInfo(id=model_id, version=version, sha256=sha, kind="fake", license="test-only",
                              path=str(path) if path is not None else None)
        self.capabilities = describe(None)

    def encode(self, volume, progress=None, cancel=None, anatomy=None) -> FakeState:
        FakeBackend.calls.append("encode")
        if cancel is not None and cancel():
            raise CancelledError("cancelled by the user")
        if progress:
            progress(1.0, "encoded")
        arr = np.asarray(volume.array)
        return FakeState(model_grid(arr.shape, volume.ijk_to_ras), np.array([float(arr.mean())], dtype=np.float32))

    def answer(self, state: FakeState, request: Request) -> Answer:
        FakeBackend.calls.append(("answer", request.text))
        logit = None
        if request.want_mask:
            logit = np.max([blob_logit(state.grid, k) for k in request.anatomies], axis=0)
            if request.kind == "finding":  # a smaller blob inside the anatomy
                logit = logit - 2.0
        scores = {}
        if request.kind == "finding" and request.want_scores:
            scores = {a: SCORES.get(request.finding, DEFAULT_SCORE) for a in request.anatomies}
        return Answer(model=self.info.id, logit=logit, grid=state.grid if logit is not None else None,
                      scores=scores, calibrated=False, decision_score=DECISION_SCORE)

    def restore(self, metadata: dict, tensors) -> FakeState:
        if "grid" not in metadata or "mean_hu" not in tensors:
            raise InputError("not an encoding of the fake backend")
        return FakeState(ModelGrid.from_dict(metadata["grid"]), np.asarray(tensors["mean_hu"], dtype=np.float32))

    def nearest_phrase(self, text: str) -> tuple:
        """(phrase, key, laterality, similarity) of the most similar vocabulary phrase."""
        from ctlanguage.prompts import vocabulary_phrases

        best = max(vocabulary_phrases(),
                   key=lambda p: difflib.SequenceMatcher(None, text.lower()[:200], p[0]).ratio())
        return best[0], best[1], best[2], difflib.SequenceMatcher(None, text.lower()[:200], best[0]).ratio()


# ---- the backend-module interface (ctlanguage.backends) ----------------------------------------
def describe(entry) -> Capabilities:
    return Capabilities(anatomy=tuple(vocabulary.anatomies()), finding_masks=True, scores=True,
                        calibrated=False, heatmaps=True, device="cpu")


def load(entry=None, device=None, progress=None, model_dir=None, warm_text=True) -> FakeBackend:
    """A FakeBackend for a model folder from :func:`make_fake_model_dir` (none: "fake-model")."""
    backend = FakeBackend(model_dir)
    if progress:
        progress(1.0, "loaded")
    return backend


def make_fake_model_dir(folder: Path, model_id: str = "fake-model") -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_id": model_id, "version": "0.1"}))
    sums = "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n"
                   for n in ("config.json", "model.safetensors"))
    (folder / "SHA256SUMS").write_text(sums)
    return folder


def install(monkeypatch):
    """Model folders (and catalog entries of the "grounded" family) load as FakeBackend in the
    real Engine."""
    from ctlanguage import backends

    monkeypatch.setitem(backends.REGISTRY, "grounded", __name__)
    FakeBackend.calls = []
    return FakeBackend


def fake_engine(model_id: str = "fake-model"):
    """The real Engine around a FakeBackend (no folder needed)."""
    from ctlanguage.engine import Engine

    return Engine.load(FakeBackend(model_id=model_id), device="cpu")

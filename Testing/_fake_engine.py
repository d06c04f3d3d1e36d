"""A fast stand-in *backend* for the command-line and glue plumbing tests, plugged into the real
``ctlanguage.engine.Engine`` through the backend registry (so the tests exercise the real engine,
encodings, findings and exports; only the model is replaced). Masks are HU thresholds inside the
body, exactly on the source grid; scores are fixed per finding and marked uncalibrated."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np

from ctlanguage import vocabulary as V
from ctlanguage.catalog import verify_model_dir
from ctlanguage.engine import Answer, Capabilities, ModelInfo
from ctlanguage.errors import CheckpointError

FAKE_SCORE = 0.25


class FakeState:
    def __init__(self, soft_tissue: np.ndarray):
        self.soft_tissue = soft_tissue

    def tensors(self):
        return {"soft_tissue": self.soft_tissue}

    def metadata(self):
        return {}

    def nbytes(self):
        return int(self.soft_tissue.nbytes)


class FakeBackend:
    """Implements ``ctlanguage.engine.protocol.Backend`` (checked by test_backend_contract)."""

    calls: list = []

    def __init__(self, path: Path):
        self.path = Path(path)
        sums = verify_model_dir(self.path)
        cfg = json.loads((self.path / "config.json").read_text())
        self.info = ModelInfo(id=cfg.get("model_id", "fake"), version=str(cfg.get("version", "0")),
                              sha256=sums["weights_sha256"], kind="fake", path=str(self.path))
        self.capabilities = Capabilities(anatomy=tuple(V.anatomies()), finding_masks=True, scores=True)

    def encode(self, volume, progress=None, cancel=None, anatomy=None):
        FakeBackend.calls.append("encode")
        if progress:
            progress(1.0, "encoded")
        arr = np.asarray(volume.array)
        return FakeState(((arr > -100) & (arr < 100)).astype(np.uint8))

    def restore(self, metadata, tensors):
        return FakeState(np.asarray(tensors["soft_tissue"], dtype=np.uint8))

    def answer(self, state, request):
        FakeBackend.calls.append(("answer", request.text))
        mask = state.soft_tissue.copy() if request.want_mask else None
        scores = {a: FAKE_SCORE for a in request.anatomies} if (
            request.kind == "finding" and request.want_scores) else {}
        return Answer(model=self.info.id, mask=mask, scores=scores, calibrated=False)

    def nearest_phrase(self, text):
        return "body", "body", None, 0.0     # nothing is close: "not understood"


def load(entry=None, device=None, progress=None, model_dir=None, warm_text=True):
    if progress:
        progress(1.0, "loaded")
    if model_dir is None or not Path(model_dir).is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    return FakeBackend(Path(model_dir))


def describe(entry):
    return Capabilities(finding_masks=True, scores=True)


def make_fake_model_dir(folder: Path, model_id: str = "fake-model") -> Path:
    import hashlib

    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_id": model_id, "version": "0.1"}))
    sums = "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n"
                   for n in ("config.json", "model.safetensors"))
    (folder / "SHA256SUMS").write_text(sums)
    return folder


def install(monkeypatch):
    """Model folders load as FakeBackend (the "grounded" family is pointed at this module)."""
    from ctlanguage import backends

    name = "_ctlanguage_fake_backend"
    mod = types.ModuleType(name)
    mod.load, mod.describe = load, describe
    monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(backends.REGISTRY, "grounded", name)
    FakeBackend.calls = []
    return FakeBackend

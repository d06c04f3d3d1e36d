"""A stand-in for ctlanguage.engine with the documented API (docs/architecture.md, ENGINE API),
used to test the command line plumbing fast and independently of model quality. Masks are
simple HU thresholds inside the body; probabilities are fixed per parsed finding."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctlanguage.catalog import verify_model_dir
from ctlanguage.errors import CheckpointError, InputError
from ctlanguage.prompts import parse_prompt


@dataclass
class Finding:
    prompt: str
    parsed: object
    anatomy: str | None
    finding: str | None
    laterality: str | None
    probability: float | None
    prompt_confidence: float
    mask: np.ndarray
    volume_ml: float
    codes: dict | None = None
    color: tuple | None = None


@dataclass
class Encoding:
    volume_hash: str
    model_id: str
    shape: tuple
    array: np.ndarray = field(repr=False, default=None)

    def save(self, path):
        Path(path).write_text(json.dumps({"volume_hash": self.volume_hash, "model_id": self.model_id,
                                          "shape": list(self.shape)}))

    @classmethod
    def load(cls, path, engine, volume=None):
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            raise InputError(f"{path} is not an encoding file") from None
        if d.get("model_id") != engine.model_id:
            raise InputError(f"the encoding {Path(path).name} was made with model {d.get('model_id')}, "
                             f"not {engine.model_id}")
        enc = cls(d["volume_hash"], d["model_id"], tuple(d["shape"]))
        if volume is not None:
            if volume.content_hash() != enc.volume_hash:
                raise InputError("The encoding was computed for a different volume; encode it again.")
            enc.array = volume.array
        return enc


class Engine:
    calls: list = []

    def __init__(self, path):
        self.path = Path(path)
        verify_model_dir(self.path)
        cfg = json.loads((self.path / "config.json").read_text())
        self.model_id = cfg.get("model_id", "fake")
        self.model_info = {"id": self.model_id, "version": cfg.get("version", "0"),
                           "sha256": verify_model_dir(self.path)["weights_sha256"]}
        self._vol = None

    @classmethod
    def load(cls, model="default", device=None, progress=None):
        if progress:
            progress(1.0, "loaded")
        p = Path(model)
        if not p.is_dir():
            raise CheckpointError(f"model folder {p} does not exist")
        return cls(p)

    def encode(self, volume, progress=None, cancel=None):
        Engine.calls.append("encode")
        if progress:
            progress(1.0, "encoded")
        return Encoding(volume.content_hash(), self.model_id, volume.array.shape, volume.array)

    def query(self, enc, prompt, mask_threshold=0.5, volume=None):
        Engine.calls.append(("query", prompt))
        p = parse_prompt(prompt)
        arr = enc.array
        if arr is None:
            arr = np.zeros(enc.shape, np.float32)
        mask = ((arr > -100) & (arr < 100)).astype(np.uint8) if p.kind != "unknown" else np.zeros(enc.shape, np.uint8)
        prob = None if p.finding is None else 0.25
        return [Finding(prompt, p, p.anatomy, p.finding, p.laterality, prob, p.confidence, mask,
                        float(mask.sum()) * 0.001)]


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
    """Make `from ctlanguage.engine import Engine, Encoding` return the fakes."""
    import sys

    mod = types.ModuleType("ctlanguage.engine")
    mod.Engine = Engine
    mod.Encoding = Encoding
    mod.Finding = Finding
    monkeypatch.setitem(sys.modules, "ctlanguage.engine", mod)
    Engine.calls = []
    return mod

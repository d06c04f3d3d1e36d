"""One encoded volume: its source grid and content hash, and one state per backend of the
pipeline that encoded it. Saved as one safetensors file (tensors named ``<model id>/<name>``)
whose metadata holds the JSON header."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import CheckpointError, ExportError, InputError

ENCODING_FORMAT = "ctlanguage-encoding-v2"


def grid_difference(a_shape, a_affine, b_shape, b_affine) -> str:
    """What differs between two voxel grids, in words ("" when they are the same)."""
    from ..volume import CTVolume

    out = []
    if tuple(a_shape) != tuple(b_shape):
        out.append(f"size {tuple(a_shape)} vs {tuple(b_shape)}")
    a, b = np.asarray(a_affine, float), np.asarray(b_affine, float)
    va, vb = CTVolume.grid_only((1, 1, 1), a), CTVolume.grid_only((1, 1, 1), b)
    if not np.allclose(va.spacing, vb.spacing, atol=1e-4):
        out.append(f"spacing {np.round(va.spacing, 3).tolist()} vs {np.round(vb.spacing, 3).tolist()} mm")
    if not np.allclose(va.direction, vb.direction, atol=1e-4):
        out.append("orientation differs")
    if not np.allclose(a[:3, 3], b[:3, 3], atol=1e-4):
        out.append(f"origin {np.round(a[:3, 3], 2).tolist()} vs {np.round(b[:3, 3], 2).tolist()}")
    return ", ".join(out)


@dataclass
class Encoding:
    """Everything ``Engine.query`` needs from one volume."""

    model_id: str                    # the pipeline (or single model) that encoded it
    model_version: str
    model_sha256: str
    volume_hash: str
    source_shape: tuple
    source_ijk_to_ras: np.ndarray
    parts: dict                      # backend model id -> its state (engine.protocol.BackendState)
    timings: dict = field(default_factory=dict)
    source: Optional[str] = None
    _volume: Any = field(default=None, repr=False, compare=False)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.source_ijk_to_ras[:3, :3]))) / 1000.0

    @property
    def volume(self):
        """The source volume (or a grid-only stand-in for an encoding loaded from disk)."""
        if self._volume is None:
            from ..volume import CTVolume

            self._volume = CTVolume.grid_only(self.source_shape, self.source_ijk_to_ras)
        return self._volume

    def part(self, model_id: Optional[str] = None):
        """The state of one backend (the only/first one when ``model_id`` is None)."""
        if model_id is None:
            return next(iter(self.parts.values()))
        return self.parts[model_id]

    def check_volume(self, volume) -> None:
        """Raise InputError unless ``volume`` is the volume this encoding was computed from."""
        diff = grid_difference(self.source_shape, self.source_ijk_to_ras,
                               volume.array.shape, volume.ijk_to_ras)
        if diff:
            raise InputError(f"The encoding was computed for another volume ({diff}); encode this "
                             "volume again.")
        if volume.content_hash() != self.volume_hash:
            raise InputError("The encoding was computed for another volume (its voxel content "
                             "differs); encode this volume again.")

    def attach(self, volume) -> "Encoding":
        """Check that ``volume`` is this encoding's volume and keep it for mapping masks."""
        self.check_volume(volume)
        self._volume = volume
        return self

    def nbytes(self) -> int:
        return int(sum(s.nbytes() for s in self.parts.values()))

    # ---- persistence -------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": ENCODING_FORMAT, "model_id": self.model_id,
            "model_version": self.model_version, "model_sha256": self.model_sha256,
            "volume_hash": self.volume_hash, "source_shape": [int(s) for s in self.source_shape],
            "source_ijk_to_ras": np.asarray(self.source_ijk_to_ras, dtype=np.float64).tolist(),
            "parts": {k: s.metadata() for k, s in self.parts.items()},
            "timings": self.timings, "source": self.source,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename); ``ExportError`` when it cannot be written."""
        from safetensors.torch import save_file

        from ..io import atomic_write

        path = Path(path)
        tensors = {}
        for mid, state in self.parts.items():
            for name, t in state.tensors().items():
                tensors[f"{mid}/{name}"] = _as_tensor(t)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"The encoding could not be written to {path} ({exc.strerror or exc}).") from exc
        header = {"ctlanguage_encoding": json.dumps(self.metadata())}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike, engine, volume=None) -> "Encoding":
        """Read an encoding written by :meth:`save` for use with ``engine``.

        CheckpointError when another model or pipeline made it; InputError when it is not an
        encoding file or ``volume`` is given and is not the volume it was made from."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"The encoding file {path} does not exist.")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = (f.metadata() or {}).get("ctlanguage_encoding")
                if meta is None:
                    raise InputError(f"{path} is not a CTLanguage encoding file (no encoding header).")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"{path} is not a readable CTLanguage encoding file ({exc}).") from exc
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} has a corrupt encoding header ({exc.msg}).") from exc
        if meta.get("format") != ENCODING_FORMAT:
            raise InputError(f"{path} has encoding format {meta.get('format')!r}; this version reads "
                             f"{ENCODING_FORMAT!r} (encode the volume again).")
        if meta.get("model_id") != engine.model_id or meta.get("model_sha256") != engine.model_sha256:
            raise CheckpointError(
                f"The encoding {path.name} was made with model {meta.get('model_id')} "
                f"(weights {str(meta.get('model_sha256'))[:12]}…), not with the loaded model "
                f"{engine.model_id} (weights {engine.model_sha256[:12]}…); encode the volume again.")
        parts = {}
        for backend in engine.backends:
            mid = backend.info.id
            pmeta = (meta.get("parts") or {}).get(mid)
            if pmeta is None:
                raise InputError(f"{path} is an incomplete encoding file (no part for {mid}).")
            prefix = f"{mid}/"
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                parts[mid] = backend.restore(pmeta, mine)
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{path} is an inconsistent encoding file ({exc}).") from exc
            except InputError as exc:
                raise InputError(f"{path}: {exc}.") from None
        enc = cls(model_id=meta["model_id"], model_version=meta.get("model_version", ""),
                  model_sha256=meta["model_sha256"], volume_hash=meta["volume_hash"],
                  source_shape=tuple(int(s) for s in meta["source_shape"]),
                  source_ijk_to_ras=np.asarray(meta["source_ijk_to_ras"], dtype=np.float64),
                  parts=parts, timings=dict(meta.get("timings") or {}), source=meta.get("source"))
        if volume is not None:
            enc.attach(volume)
        return enc


def _as_tensor(t):
    import torch

    if isinstance(t, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(t))
    return t.detach().cpu().contiguous()

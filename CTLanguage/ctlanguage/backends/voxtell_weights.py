"""Where VoxTell's files are and how they are opened safely.

A VoxTell model folder (Hugging Face ``mrokuss/VoxTell``, folder ``voxtell_v1.1``) holds
``plans.json`` (the network's architecture, nnU-Net format) and ``fold_0/checkpoint_final.pth``
(a pickle). The pickle is opened once, only with ``torch.load(weights_only=True)``, after its size
and sha256 are checked against the catalog where the catalog records them; its network weights
must fit the network exactly and are then kept as safetensors in our cache, keyed by that sha256,
so later loads unpickle nothing. The precomputed text-embedding bank lies beside the folder
(``embeddings/voxtell_v1.1/text_embeddings.npz``: ``labels`` + float16 ``embeddings``).
"""

from __future__ import annotations

import json
import logging
import os
import pydoc
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, ExportError, InputError

log = logging.getLogger(__name__)

MODEL_ENV = "VOXTELL_MODEL"            # the package's own variable: the model folder
BANK_ENV = "VOXTELL_EMBEDDINGS"        # a text_embeddings.npz
TEXT_MODEL_ENV = "VOXTELL_TEXT_MODEL"  # a local folder (or Hub id) of the text model
TEXT_MODEL = "Qwen/Qwen3-Embedding-4B"
HUB_REPO = "mrokuss/VoxTell"
MODEL_NAME = "voxtell_v1.1"
CHECKPOINT = Path("fold_0") / "checkpoint_final.pth"
PLANS = "plans.json"

# The published network's fixed sizes (VoxTellPredictor builds it with exactly these)
NETWORK_KWARGS = dict(input_channels=1, decoder_layer=4, text_embedding_dim=2560,
                      num_maskformer_stages=5, num_heads=32, query_dim=2048,
                      project_to_decoder_hidden_dim=2048, deep_supervision=False)
# plans.json names classes to import; only these packages may be named
IMPORTABLE = ("torch.nn.", "dynamic_network_architectures.")

WEIGHTS_HINT = (f"Download the VoxTell weights once with `hf download {HUB_REPO} --include "
                f"'{MODEL_NAME}/*' --include 'embeddings/{MODEL_NAME}/*' --local-dir <folder>` "
                f"(~1.7 GB) and set {MODEL_ENV} to <folder>/{MODEL_NAME}.")


def model_dir_for(entry=None, model_dir=None) -> Optional[Path]:
    """The model folder from (first given) the argument, the catalog entry's ``model_dir``,
    ``$VOXTELL_MODEL`` and the local Hugging Face cache (``hf download`` without --local-dir);
    None when none is found. Never downloads."""
    extra = getattr(entry, "extra", None) or {}
    spec = model_dir or extra.get("model_dir") or os.environ.get(MODEL_ENV)
    if spec:
        return Path(spec).expanduser()
    return _hub_cache_dir(HUB_REPO, MODEL_NAME)


def _hub_cache_dir(repo: str, sub: str = "") -> Optional[Path]:
    """``sub`` of the newest local snapshot of ``repo`` in the Hugging Face cache, or None."""
    try:
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(repo_id=repo, local_files_only=True)) / sub
    except Exception:   # not cached (the hub raises several kinds of "not found")
        return None
    return d if d.is_dir() else None


def check_model_dir(d: Optional[Path]) -> Path:
    """``d`` when it holds plans.json and the checkpoint; else InputError saying how to get it."""
    if d is None:
        raise InputError(f"VoxTell weights are not set up. {WEIGHTS_HINT}")
    missing = [str(p) for p in (PLANS, CHECKPOINT) if not (d / p).is_file()]
    if missing:
        raise InputError(f"{d} is not a VoxTell model folder (no {' or '.join(missing)}). "
                         f"{WEIGHTS_HINT}")
    return d


def bank_path_for(model_dir: Path, entry=None) -> Optional[Path]:
    """The precomputed embedding bank: ``$VOXTELL_EMBEDDINGS``, the entry's ``embedding_bank``, or
    ``embeddings/<model>/text_embeddings.npz`` beside the model folder (the Hub layout)."""
    extra = getattr(entry, "extra", None) or {}
    spec = os.environ.get(BANK_ENV) or extra.get("embedding_bank")
    if spec:
        p = Path(spec).expanduser()
        if not p.is_file():
            raise InputError(f"The VoxTell embedding bank {p} does not exist.")
        return p
    for p in (model_dir.parent / "embeddings" / model_dir.name / "text_embeddings.npz",
              model_dir / "text_embeddings.npz"):
        if p.is_file():
            return p
    return None


def load_bank(path: Optional[Path]) -> dict:
    """{lower-case prompt: float16 vector}; empty without a bank (never a download)."""
    if path is None:
        return {}
    from voxtell.utils.embedding_bank import load_embedding_bank

    try:
        return load_embedding_bank(str(path))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path} is not a VoxTell embedding bank ({exc}).") from None


def local_text_model(entry=None) -> Optional[str]:
    """A local folder holding the text model (config + weights), or None: never downloads."""
    extra = getattr(entry, "extra", None) or {}
    spec = os.environ.get(TEXT_MODEL_ENV) or extra.get("text_model") or TEXT_MODEL
    p = Path(spec).expanduser()
    d = p if p.is_dir() else _hub_cache_dir(spec)
    if d is not None and (d / "config.json").is_file() and any(d.glob("*.safetensors")):
        return str(d)
    return None


def read_plans(model_dir: Path) -> dict:
    try:
        plans = json.loads((model_dir / PLANS).read_text(encoding="utf-8"))
        plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        plans["configurations"]["3d_fullres"]["patch_size"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{model_dir / PLANS} is not a VoxTell plans file ({exc}).") from None
    return plans


def build_network(plans: dict, network_cls=None):
    """The VoxTell network of ``plans`` (random weights), as the predictor builds it."""
    if network_cls is None:
        from voxtell.model.voxtell_model import VoxTellModel as network_cls
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch.get("_kw_requires_import", ()):
        name = kwargs.get(key)
        if name is None:
            continue
        if not str(name).startswith(IMPORTABLE):
            raise CheckpointError(f"plans.json names {name!r} for {key}; refusing to import it.")
        kwargs[key] = pydoc.locate(name)
        if kwargs[key] is None:
            raise CheckpointError(f"plans.json names {name!r} for {key}, which does not exist.")
    return network_cls(**NETWORK_KWARGS, **kwargs)


def _safe_globals() -> list:
    """What nnU-Net checkpoints hold besides tensors: numpy scalars/arrays (old and new names)."""
    import numpy as np

    mod = getattr(np, "_core", None) or np.core
    out = [np.dtype, np.ndarray, mod.multiarray.scalar, mod.multiarray._reconstruct,
           (mod.multiarray.scalar, "numpy.core.multiarray.scalar"),
           (mod.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    out += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i4", "i8", "u1", "b1")]
    return out


def read_checkpoint(path: Path) -> dict:
    """The network weights of a VoxTell checkpoint, unpickled with ``weights_only=True``."""
    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # pickle/zip errors of every kind
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read as a weights-only checkpoint ({first}).") from None
    sd = ckpt.get("network_weights") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no 'network_weights' tensors; not a VoxTell checkpoint.")
    return sd


def load_weights(network, model_dir: Path, expected_size: Optional[int] = None,
                 expected_sha256: Optional[str] = None, progress=None) -> str:
    """Load the checkpoint into ``network`` (strictly); returns the checkpoint's sha256.

    The first load checks the file (size, sha256), unpickles it weights-only and keeps the weights
    as safetensors in ``<cache>/voxtell/<sha256[:16]>/``; later loads read those (the pickle is
    re-hashed only when its size or modification time changed)."""
    from safetensors.torch import load_model, save_model

    from ..catalog import cache_dir, sha256_file
    from ..engine.progress import report
    from ..io import atomic_write

    ckpt = model_dir / CHECKPOINT
    st = ckpt.stat()
    if expected_size and st.st_size != int(expected_size):
        raise CheckpointError(f"{ckpt} has {st.st_size} bytes, the catalog expects {expected_size}: "
                              "incomplete or a different release.")
    root = cache_dir() / "voxtell"
    index_path = root / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    key = str(ckpt.resolve())
    rec = index.get(key) or {}
    sha = rec.get("sha256") if (rec.get("size"), rec.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) else None
    if sha is None or not (root / sha[:16] / "network.safetensors").is_file():
        report(progress, 0.2, f"Checking the VoxTell checkpoint ({st.st_size / 1e9:.1f} GB)")
        sha = sha256_file(ckpt)
    if expected_sha256 and sha != expected_sha256.lower():
        raise CheckpointError(f"{ckpt} does not match the catalog's sha256 (expected "
                              f"{expected_sha256[:12]}…, got {sha[:12]}…): corrupt or a different release.")
    converted = root / sha[:16] / "network.safetensors"
    if converted.is_file():
        try:   # save_model/load_model: the network shares its encoder with the decoder
            load_model(network, str(converted), strict=True)
        except (RuntimeError, OSError, ValueError) as exc:
            raise CheckpointError(f"the converted VoxTell weights {converted} do not fit the "
                                  f"network ({str(exc).splitlines()[0]}); delete that file.") from None
    else:
        report(progress, 0.4, "Reading the VoxTell checkpoint (first use: converted to safetensors)")
        _strict_load(network, read_checkpoint(ckpt), ckpt)
        try:
            converted.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(converted, lambda tmp: save_model(network, str(tmp),
                                                           metadata={"source_sha256": sha}))
        except (OSError, ExportError) as exc:
            log.warning("could not keep the converted VoxTell weights in %s (%s)", root, exc)
    if rec.get("sha256") != sha or rec.get("mtime_ns") != st.st_mtime_ns:
        index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        try:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write(index_path, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
        except (OSError, ExportError):
            log.debug("could not update %s", index_path, exc_info=True)
    return sha


def _strict_load(network, sd: dict, source: Path) -> None:
    own = network.state_dict()
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    if unexpected or missing:
        parts = [f"{len(x)} {what} (e.g. {x[0]})" for x, what in
                 ((unexpected, "unexpected keys"), (missing, "missing keys")) if x]
        raise CheckpointError(f"{source} does not fit the VoxTell network of plans.json: "
                              f"{'; '.join(parts)}.")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{source} does not fit the VoxTell network of plans.json: {bad[0]} "
                              f"has shape {tuple(sd[bad[0]].shape)}, the network {tuple(own[bad[0]].shape)}.")
    network.load_state_dict(sd, strict=True)

"""Merlin weights: download, the one safe read of the published pickle, conversion to safetensors.

The published checkpoint (``stanfordmimi/Merlin``, a pickled flat state dict) is opened only
after its size (and sha256, when the catalog records one) matched, and only with
``torch.load(weights_only=True)``; every value must be a tensor and every key must map onto our
model (:data:`PREFIXES`) with the expected shape. It is converted once into a model folder in the
cache (``model.safetensors`` under our parameter names, ``config.json``, ``SHA256SUMS``,
``tokenizer/``); later loads read only that folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ... import catalog
from ...errors import CheckpointError, CTLanguageError
from . import text as text_mod

# upstream name prefix -> ours
PREFIXES = {
    "encode_image.i3_resnet.": "image.",
    "encode_text.text_encoder.": "text.longformer.",
    "encode_text.linear_layer.": "text.proj.",
}
SCALARS = {"logit_scale": "logit_scale"}
# buffers that some transformers versions save and others do not (recomputed at run time)
OPTIONAL = ("text.longformer.embeddings.position_ids",)
FORMAT = "ctlanguage-merlin/1"
TOKENIZER_DIR = "tokenizer"


# ----------------------------------------------------------------------------- reading

def read_checkpoint(path: str | Path, size: int | None = None, sha256: str | None = None,
                    containers: tuple = ("state_dict",)) -> dict:
    """Tensors of a pickled checkpoint, after the size/sha256 checks, with weights_only=True.
    Accepts a flat ``{name: tensor}`` dict or ``{<one of containers>: {...}, ...}`` (the other
    entries, e.g. optimizer state, are dropped)."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    actual_size = p.stat().st_size
    if size is not None and actual_size != int(size):
        raise CheckpointError(f"{p.name} has {actual_size:,} bytes, expected {int(size):,}: "
                              "incomplete or a different file")
    if sha256:
        got = catalog.sha256_file(p)
        if got != sha256.lower():
            raise CheckpointError(f"{p.name} does not match its recorded sha256 (expected "
                                  f"{sha256[:12]}…, got {got[:12]}…): corrupt or tampered")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p.name} is not a plain tensor checkpoint; refusing it ({first})") from None
    for key in containers:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{p.name} does not hold a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p.name} holds {len(bad)} non-tensor entries (e.g. {str(bad[0])!r}); "
                              "refusing it")
    return obj


def map_upstream(state: dict) -> dict:
    """Upstream names (``encode_image.i3_resnet.*``, ``encode_text.*``, ``logit_scale``) -> ours.
    Any other name is refused."""
    out, foreign = {}, []
    for k, v in state.items():
        for src, dst in PREFIXES.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            if k in SCALARS:
                out[SCALARS[k]] = v
            else:
                foreign.append(k)
    if foreign:
        raise CheckpointError(f"the checkpoint has {len(foreign)} keys that are not Merlin's "
                              f"(e.g. {foreign[0]!r}); refusing it")
    return out


def check_against(state: dict, expected: dict, what: str = "the checkpoint") -> dict:
    """``state`` restricted to ``expected`` (name -> shape); refuses missing, unexpected or
    mis-shaped tensors (the OPTIONAL buffers excepted)."""
    state = {k: v for k, v in state.items() if not (k in OPTIONAL and k not in expected)}
    missing = [k for k in expected if k not in state and k not in OPTIONAL]
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{what} has {len(unexpected)} unexpected keys "
                              f"(e.g. {unexpected[0]!r}); refusing it")
    if missing:
        raise CheckpointError(f"{what} lacks {len(missing)} of the model's tensors "
                              f"(e.g. {missing[0]!r})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise CheckpointError(f"{what}: tensor {k!r} has shape {tuple(v.shape)}, the model "
                                  f"expects {tuple(expected[k])}")
    return state


# ----------------------------------------------------------------------------- conversion

def text_config(state: dict, tokenizer_dir: str | Path | None) -> dict:
    prefix = "text.longformer."
    shapes = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    base = dict(text_mod.CLINICAL_LONGFORMER)
    if tokenizer_dir is not None:
        base.update(text_mod.folder_overrides(tokenizer_dir))
    return text_mod.config_from_shapes(shapes, base)


def expected_shapes(cfg: dict) -> dict:
    """Name -> shape of every tensor of our full model, built on the meta device (no memory)."""
    import torch

    from .network import MerlinNet

    with torch.device("meta"):
        net = MerlinNet(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def convert(checkpoint: str | Path, tokenizer_dir: str | Path, dest: str | Path, *,
            model_id: str = "merlin", version: str = "", size: int | None = None,
            sha256: str | None = None, url: str | None = None) -> dict:
    """Check and convert the upstream pickle into a model folder ``dest`` (created atomically:
    written to a temporary sibling, verified, then renamed). Returns its config."""

    tok = Path(tokenizer_dir)
    text_mod.load_tokenizer(tok)  # fail early if the tokenizer files are missing or unreadable
    state = map_upstream(read_checkpoint(checkpoint, size=size, sha256=sha256))
    source_sha = sha256.lower() if sha256 else catalog.sha256_file(checkpoint)
    cfg = text_config(state, tok)
    state = check_against(state, expected_shapes(cfg))
    return write_converted_folder(
        dest, state, fmt=FORMAT, tokenizer_dir=tok,
        tokenizer_files=text_mod.TOKENIZER_FILES + text_mod.TOKENIZER_OPTIONAL,
        config={"id": model_id, "version": version, "backend": "merlin", "format": FORMAT, "text_config": cfg},
        checkpoint=checkpoint, url=url, sha256=sha256, source_sha=source_sha)


def write_converted_folder(dest, state: dict, *, fmt: str, tokenizer_dir, tokenizer_files, config: dict,
                           checkpoint, url, sha256, source_sha: str) -> dict:
    """Write a converted published model atomically (temporary sibling, verified, renamed into
    ``dest``): fp32 ``model.safetensors``, the tokenizer files, ``config.json`` = ``config`` + where
    the weights came from + the tokenizer files' hashes, ``SHA256SUMS``. Returns the config."""
    import torch
    from safetensors.torch import save_file

    dest, tok = Path(dest), Path(tokenizer_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tensors = {k: v.detach().to(torch.float32).contiguous() if v.is_floating_point()
                   else v.detach().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / catalog.WEIGHTS), metadata={"format": fmt})
        del tensors
        (tmp / TOKENIZER_DIR).mkdir()
        for name in tokenizer_files:
            if (tok / name).is_file():
                shutil.copyfile(tok / name, tmp / TOKENIZER_DIR / name)
        config = {**config,
                  "source": {"file": Path(checkpoint).name, "url": url,
                             "size": Path(checkpoint).stat().st_size, "sha256": source_sha,
                             "sha256_from": "catalog" if sha256 else "computed at conversion"},
                  # no published hashes for these: recorded so that a later change is visible
                  "tokenizer_sha256": {p.name: catalog.sha256_file(p)
                                       for p in sorted((tmp / TOKENIZER_DIR).iterdir())}}
        (tmp / catalog.CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        sums = [f"{catalog.sha256_file(tmp / n)}  {n}" for n in (catalog.WEIGHTS, catalog.CONFIG)]
        (tmp / catalog.SUMS).write_text("\n".join(sums) + "\n", encoding="utf-8")
        catalog.verify_model_dir(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return config


def read_config(folder: str | Path) -> dict:
    p = Path(folder) / catalog.CONFIG
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p} is unreadable ({exc})") from None
    if cfg.get("format") != FORMAT or not isinstance(cfg.get("text_config"), dict):
        raise CheckpointError(f"{folder} is not a converted Merlin model folder ({FORMAT})")
    return cfg


# ----------------------------------------------------------------------------- download

def download(entry, progress=None, force: bool = False, source: str | Path | None = None,
             tokenizer: str | Path | None = None, timeout: float = 30.0) -> Path:
    """Fetch (or take ``source``, a local copy of the checkpoint), check and convert into the
    cache; returns the model folder. The pickle and tokenizer files come from the catalog entry's
    ``url`` and ``tokenizer_url`` (or ``tokenizer``, a local folder with vocab.json + merges.txt)."""
    target = catalog.cached_model_dir(entry)
    if (target / catalog.WEIGHTS).is_file() and not force:
        catalog.verify_model_dir(target, entry)
        return target
    downloads = catalog.cache_dir() / "downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTLanguageError(f"cannot create the model cache {downloads}: {exc.strerror}") from None
    fetched = []  # files this call downloaded (deleted after a successful conversion)
    if source is not None:
        pt = Path(source).expanduser()
    else:
        if not entry.url:
            raise CheckpointError(f"catalog entry {entry.id} has no download url")
        pt = downloads / f"{entry.id}-{entry.version}.pt"
        if force:
            pt.unlink(missing_ok=True)
        if not pt.is_file():
            part = pt.with_name(pt.name + ".part")
            catalog._fetch(entry.url, part, entry.size, progress, timeout, 1 << 20)
            os.replace(part, pt)
        fetched.append(pt)
    try:
        if tokenizer is not None:
            tok = Path(tokenizer).expanduser()
        else:
            tok = downloads / f"{entry.id}-{entry.version}-tokenizer"
            base = entry.extra.get("tokenizer_url")
            if not base:
                raise CheckpointError(f"catalog entry {entry.id} has no tokenizer_url; give a "
                                      "local Clinical-Longformer tokenizer folder")
            tok.mkdir(exist_ok=True)
            for name in text_mod.TOKENIZER_FILES + ("config.json",):
                if not (tok / name).is_file():
                    part = tok / (name + ".part")
                    catalog._fetch(base.rstrip("/") + "/" + name, part, None, None, timeout, 1 << 16)
                    os.replace(part, tok / name)
            fetched.append(tok)
        convert(pt, tok, target, model_id=entry.id, version=entry.version, url=entry.url,
                size=entry.size, sha256=entry.sha256)
    except CheckpointError:
        # a wrong or tampered download is removed so that the next try starts afresh
        for f in fetched:
            if f.is_file() and f.suffix == ".pt":
                f.unlink(missing_ok=True)
        raise
    for f in fetched:
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)
    return target

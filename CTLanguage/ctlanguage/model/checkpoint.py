"""Checkpoint I/O: model.safetensors + config.json + SHA256SUMS. Never reads pickles.

Layout of a model folder:
  config.json         ModelConfig as JSON (includes calibration temperature, provenance)
  model.safetensors   trainable weights only (the frozen text LM is referenced by name in config)
  SHA256SUMS          "<sha256>  <file>" lines for config.json and model.safetensors
  text_embeddings.safetensors  optional frozen-LM embeddings of the vocabulary (text_cache.py),
                      hashed in SHA256SUMS when present
  README.md           optional model card (not hashed, so it can be edited)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import ModelConfig
from .text_cache import TEXT_CACHE, read_text_cache

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SUMS = "SHA256SUMS"
HASHED = (CONFIG, WEIGHTS)
_PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_sha256sums(directory: str | Path, names=HASHED) -> None:
    d = Path(directory)
    lines = [f"{sha256_file(d / n)}  {n}\n" for n in names]
    (d / SUMS).write_text("".join(lines))


def read_sha256sums(directory: Path) -> dict[str, str]:
    sums = {}
    try:
        text = (directory / SUMS).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"The checksum file {directory / SUMS} cannot be read ({exc}).") from exc
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise CheckpointError(f"The checksum file {directory / SUMS} is malformed: {line!r}.")
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def weights_sha256(directory: str | Path) -> str:
    """sha256 of a model folder's weights (from SHA256SUMS when present, else hashed)."""
    d = Path(directory)
    if (d / SUMS).is_file():
        sha = read_sha256sums(d).get(WEIGHTS)
        if sha:
            return sha
    return sha256_file(d / WEIGHTS)


def verify_checksums(directory: str | Path) -> None:
    d = Path(directory)
    if not (d / SUMS).is_file():
        raise CheckpointError(
            f"The model folder {d} has no {SUMS} file, so its integrity cannot be checked."
        )
    sums = read_sha256sums(d)
    for name in HASHED:
        if name not in sums:
            raise CheckpointError(f"{SUMS} in {d} has no checksum for {name}.")
        actual = sha256_file(d / name)
        if actual != sums[name]:
            raise CheckpointError(
                f"{name} in {d} does not match its sha256 in {SUMS} (expected {sums[name][:12]}…, "
                f"got {actual[:12]}…): the file is corrupt or was modified."
            )


def save_pretrained(model, directory: str | Path, extra_files: dict[str, str] | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write the model folder atomically (temporary sibling folder, then rename)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "ctlanguage": model.config.format})
        model.config.save(tmp / CONFIG)
        write_sha256sums(tmp)
        # keep files that are not ours (model card etc.) unless replaced by extra_files
        if directory.is_dir():
            for f in directory.iterdir():
                if f.is_file() and f.name not in (WEIGHTS, CONFIG, SUMS) and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if (tmp / TEXT_CACHE).is_file():  # kept from before: LM outputs do not depend on our weights
            write_sha256sums(tmp, names=HASHED + (TEXT_CACHE,))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a model folder is meant to be shared/read
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _check_safetensors_header(path: Path) -> None:
    """Refuse pickles/zip archives and truncated files before handing the file to safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        ok = 0 < n <= size - 8 and n < (100 << 20)
        first = f.read(1) if ok else b""
    if ok and first == b"{":
        return
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise CheckpointError(
            f"{path} is a pickled PyTorch file, not safetensors; CTLanguage never loads pickles."
        )
    raise CheckpointError(f"{path} is not a readable safetensors file (bad or truncated header).")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _check_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}).") from exc


def load_pretrained(cls, directory: str | Path, device=None, verify: bool = True, text_encoder=None):
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"The model folder {d} does not exist.")
    if not (d / WEIGHTS).is_file():
        pickles = [n for n in _PICKLE_NAMES if (d / n).exists()]
        if pickles:
            raise CheckpointError(
                f"{d} only holds a pickled checkpoint ({pickles[0]}); CTLanguage loads "
                "model.safetensors only and never unpickles files."
            )
        raise CheckpointError(f"The model folder {d} has no {WEIGHTS}.")
    if not (d / CONFIG).is_file():
        raise CheckpointError(f"The model folder {d} has no {CONFIG}.")
    if verify:
        verify_checksums(d)
    config = ModelConfig.load(d / CONFIG)
    state = load_state_dict(d / WEIGHTS)
    model = cls(config, text_encoder=text_encoder)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{d / WEIGHTS} does not match its config.json: missing {missing[:5]}"
            f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'…' if len(unexpected) > 5 else ''}."
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{d / WEIGHTS} does not match its config.json: tensor {k} has shape "
                f"{tuple(state[k].shape)}, expected {tuple(v.shape)}."
            )
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise CheckpointError(f"{d / WEIGHTS} holds non-finite values in tensor {k}.")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items()})
    if (d / TEXT_CACHE).is_file():
        listed = read_sha256sums(d).get(TEXT_CACHE) if (d / SUMS).is_file() else None
        stored = read_text_cache(d, model.text_encoder.fingerprint(), listed, verify=verify)
        if stored:
            model.text_encoder.remember(list(stored), torch.stack(list(stored.values())))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return model


def read_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / CONFIG).read_text())

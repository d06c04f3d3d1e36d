"""fVLM weights: the one safe read of the published checkpoint, conversion to safetensors, the
CXR-BERT tokenizer files and the user's confirmation of the terms.

The authors publish the CT-RATE-trained checkpoint on Google Drive (no stable direct URL, no
published size or hash): the user downloads it and runs
``ctlanguage models download fvlm --from FILE --accept-licence``. The pickle is opened only with
``torch.load(weights_only=True)`` after the size/sha256 checks the catalog records (none yet: the
sha256 is computed and recorded at conversion). It holds ``{"model": state dict, ...}`` (training
state next to it is dropped). Names are the model's own (``network.FVLMNet``); three groups the
text encoder carries but never uses at inference are dropped and counted (:data:`UNUSED`); any
other unknown, missing or mis-shaped tensor refuses the file.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from ... import catalog
from ...errors import CheckpointError, CTLanguageError
from ..merlin.weights import read_checkpoint, write_converted_folder

FORMAT = "ctlanguage-fvlm/1"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("vocab.txt",)
TOKENIZER_OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json", "config.json")
TERMS_ENV = "CTLANGUAGE_ACCEPT_FVLM_TERMS"
TERMS = ("fVLM's code and weights carry no licence file, and its training data (CT-RATE) is "
         "licensed for non-commercial use only")
# carried by the checkpoint, unused at inference: the masked-LM head, BERT's position-id buffer
# and token-type table (fVLM calls its text encoder without token-type ids)
UNUSED = ("text_encoder.cls.", "text_encoder.embeddings.position_ids",
          "text_encoder.embeddings.token_type_embeddings.")
# CXR-BERT (microsoft/BiomedVLP-CXR-BERT-specialized config.json); sizes are re-read from the
# checkpoint's shapes, the rest may come from the config.json next to the tokenizer
CXR_BERT = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}
_FROM_FOLDER = ("num_attention_heads", "layer_norm_eps", "hidden_act", "pad_token_id")


def terms_accepted(config: dict | None = None) -> bool:
    return os.environ.get(TERMS_ENV, "") == "1" or bool((config or {}).get("terms_accepted"))


def require_terms(config: dict | None = None) -> None:
    if not terms_accepted(config):
        raise CheckpointError(f"{TERMS}: confirm that your use fits these terms with "
                              f"`ctlanguage models download fvlm --accept-licence` (or set {TERMS_ENV}=1)")


# ----------------------------------------------------------------------------- configs

def configs_from_shapes(shapes: dict, tokenizer_dir: str | Path | None = None) -> tuple:
    """(vision, text) configs for a state dict's ``shapes`` (name -> shape)."""
    try:
        hidden = int(shapes["visual_encoder.patch_embedding.position_embeddings"][-1])
        mlp = int(shapes["visual_encoder.blocks.0.mlp.linear1.weight"][0])
        t = dict(CXR_BERT)
        t["vocab_size"], t["hidden_size"] = map(int, shapes["text_encoder.embeddings.word_embeddings.weight"])
        t["max_position_embeddings"] = int(shapes["text_encoder.embeddings.position_embeddings.weight"][0])
        t["intermediate_size"] = int(shapes["text_encoder.encoder.layer.0.intermediate.dense.weight"][0])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint lacks an fVLM tensor ({exc})") from None
    blocks = {int(k.split(".")[2]) for k in shapes if k.startswith("visual_encoder.blocks.")}
    layers = {int(k.split(".")[3]) for k in shapes if k.startswith("text_encoder.encoder.layer.")}
    for what, ids in (("image", blocks), ("text", layers)):
        if not ids or ids != set(range(len(ids))):
            raise CheckpointError(f"the checkpoint's {what} encoder has blocks {sorted(ids)[:5]}…, not 0..N-1")
    t["num_hidden_layers"] = len(layers)
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "config.json").is_file():
        p = Path(tokenizer_dir) / "config.json"
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{p} is not valid JSON ({exc})") from None
        t.update({k: d[k] for k in _FROM_FOLDER if k in d})
    vision = {"hidden": hidden, "layers": len(blocks), "heads": 12 if hidden % 12 == 0 else 1,
              "mlp": mlp, "pool_heads": 4}
    for h, heads in ((hidden, vision["pool_heads"]), (t["hidden_size"], t["num_attention_heads"])):
        if h % int(heads):
            raise CheckpointError(f"width {h} is not divisible by {heads} attention heads")
    return vision, t


def expected_shapes(vision: dict, text: dict) -> dict:
    """Name -> shape of every tensor of our model, built on the meta device."""
    import torch

    from .network import FVLMNet

    with torch.device("meta"):
        net = FVLMNet(vision, text)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def split_unused(state: dict) -> tuple:
    keep = {k: v for k, v in state.items() if not k.startswith(UNUSED)}
    return keep, sorted(set(state) - set(keep))


def check_against(state: dict, expected: dict, what: str = "the checkpoint") -> dict:
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{what} has {len(unexpected)} keys that are not fVLM's "
                              f"(e.g. {unexpected[0]!r}); refusing it")
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{what} lacks {len(missing)} of fVLM's tensors (e.g. {missing[0]!r})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise CheckpointError(f"{what}: tensor {k!r} has shape {tuple(v.shape)}, fVLM expects "
                                  f"{tuple(expected[k])}")
    return state


def load_tokenizer(folder: str | Path):
    """CXR-BERT's WordPiece tokenizer from a local folder (never the Hub)."""
    from transformers import BertTokenizer

    folder = Path(folder)
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"the CXR-BERT tokenizer folder {folder} lacks {', '.join(missing)}")
    return BertTokenizer.from_pretrained(str(folder), local_files_only=True)


# ----------------------------------------------------------------------------- conversion

def convert(checkpoint: str | Path, tokenizer_dir: str | Path, dest: str | Path, *,
            model_id: str = "fvlm", version: str = "", size: int | None = None,
            sha256: str | None = None, url: str | None = None, accept_terms: bool = False) -> dict:
    """Check and convert the published pickle into the model folder ``dest`` (written to a
    temporary sibling, verified, then renamed). Returns its config."""

    if not accept_terms:
        require_terms()
    tok = Path(tokenizer_dir)
    load_tokenizer(tok)   # fail early on missing or unreadable tokenizer files
    state = read_checkpoint(checkpoint, size=size, sha256=sha256, containers=("model",))
    source_sha = sha256.lower() if sha256 else catalog.sha256_file(checkpoint)
    state, dropped = split_unused(state)
    vision, text = configs_from_shapes({k: tuple(v.shape) for k, v in state.items()}, tok)
    state = check_against(state, expected_shapes(vision, text))
    return write_converted_folder(
        dest, state, fmt=FORMAT, tokenizer_dir=tok, tokenizer_files=TOKENIZER_FILES + TOKENIZER_OPTIONAL,
        config={"id": model_id, "version": version, "backend": "fvlm", "format": FORMAT,
                "vision_config": vision, "text_config": text,
                "dropped_unused": {"count": len(dropped), "prefixes": list(UNUSED)},
                "terms": TERMS,
                "terms_accepted": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        checkpoint=checkpoint, url=url, sha256=sha256, source_sha=source_sha)


def read_config(folder: str | Path) -> dict:
    p = Path(folder) / catalog.CONFIG
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p} is unreadable ({exc})") from None
    if cfg.get("format") != FORMAT or not isinstance(cfg.get("vision_config"), dict) \
            or not isinstance(cfg.get("text_config"), dict):
        raise CheckpointError(f"{folder} is not a converted fVLM model folder ({FORMAT})")
    return cfg


# ----------------------------------------------------------------------------- download

def download(entry, progress=None, force: bool = False, source: str | Path | None = None,
             tokenizer: str | Path | None = None, accept_licence: bool = False,
             timeout: float = 30.0) -> Path:
    """Convert the user's copy of the checkpoint (``source``) into the cache; the tokenizer comes
    from ``tokenizer`` (a local CXR-BERT folder) or the catalog's ``tokenizer_url``."""
    from . import WEIGHTS_HINT

    target = catalog.cached_model_dir(entry)
    if (target / catalog.WEIGHTS).is_file() and not force and source is None:
        catalog.verify_model_dir(target, entry)
        return target
    if source is None:
        raise CheckpointError(WEIGHTS_HINT)
    if not accept_licence:
        require_terms()
    pt = Path(source).expanduser()
    fetched = None
    if tokenizer is not None:
        tok = Path(tokenizer).expanduser()
    else:
        base = entry.extra.get("tokenizer_url")
        if not base:
            raise CheckpointError(f"catalog entry {entry.id} has no tokenizer_url; give a local "
                                  "CXR-BERT tokenizer folder with --tokenizer")
        downloads = catalog.cache_dir() / "downloads"
        try:
            downloads.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CTLanguageError(f"cannot create the model cache {downloads}: {exc.strerror}") from None
        tok = fetched = downloads / f"{entry.id}-{entry.version}-tokenizer"
        tok.mkdir(exist_ok=True)
        for name in TOKENIZER_FILES + TOKENIZER_OPTIONAL:
            if not (tok / name).is_file():
                part = tok / (name + ".part")
                try:
                    catalog._fetch(base.rstrip("/") + "/" + name, part, None, None, timeout, 1 << 16)
                except CTLanguageError:
                    if name in TOKENIZER_FILES:
                        raise
                    part.unlink(missing_ok=True)
                    continue
                os.replace(part, tok / name)
    convert(pt, tok, target, model_id=entry.id, version=entry.version, url=entry.url,
            size=entry.size, sha256=entry.sha256, accept_terms=True)
    if fetched is not None:
        shutil.rmtree(fetched, ignore_errors=True)
    return target

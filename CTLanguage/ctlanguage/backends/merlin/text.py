"""Merlin's text encoder: Clinical-Longformer (built from a config, weights from the Merlin
checkpoint) + a 768 -> 512 linear projection of the first (<s>) token.

Nothing is fetched: the network is built from :func:`longformer_config` and the tokenizer is read
from a local folder holding Clinical-Longformer's ``vocab.json`` and ``merges.txt`` (RoBERTa
byte-level BPE; transformers maps model type ``longformer`` to ``RobertaTokenizer``).

Text is normalised as Merlin does it: lower case, then the words and punctuation runs of NLTK's
``wordpunct_tokenize`` (regex ``\\w+|[^\\w\\s]+``) joined by single spaces; at most 1024 tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError

MAX_TOKENS = 1024
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# copied with them when present (a full Clinical-Longformer folder also holds its weights: not copied)
TOKENIZER_OPTIONAL = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")

# Clinical-Longformer (yikuan8/Clinical-Longformer config.json, = longformer-base-4096's); the
# size fields are re-checked against the checkpoint's tensor shapes by ``config_from_shapes``.
CLINICAL_LONGFORMER = {
    "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "max_position_embeddings": 4098, "type_vocab_size": 1,
    "attention_window": 512, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "sep_token_id": 2,
}
# the fields a config.json in the tokenizer folder may override (those not visible in shapes)
_FROM_FOLDER = ("num_attention_heads", "attention_window", "layer_norm_eps", "hidden_act",
                "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id")


def normalise(text: str) -> str:
    """Merlin's report normalisation (lower case, word/punctuation tokens joined by spaces)."""
    return " ".join(_WORDPUNCT.findall(text.lower()))


def config_from_shapes(shapes: dict, base: dict | None = None) -> dict:
    """Longformer config for text-encoder tensors ``shapes`` (names relative to the Longformer,
    e.g. ``embeddings.word_embeddings.weight``): sizes read from the shapes, the rest from
    ``base`` (default: Clinical-Longformer's)."""
    cfg = dict(base or CLINICAL_LONGFORMER)
    try:
        vocab, hidden = shapes["embeddings.word_embeddings.weight"]
        cfg["vocab_size"], cfg["hidden_size"] = int(vocab), int(hidden)
        cfg["max_position_embeddings"] = int(shapes["embeddings.position_embeddings.weight"][0])
        cfg["type_vocab_size"] = int(shapes["embeddings.token_type_embeddings.weight"][0])
        cfg["intermediate_size"] = int(shapes["encoder.layer.0.intermediate.dense.weight"][0])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's text encoder lacks a Longformer tensor ({exc})") from None
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layer.")}
    cfg["num_hidden_layers"] = len(layers)
    if layers != set(range(len(layers))) or not layers:
        raise CheckpointError(f"the checkpoint's text encoder has layers {sorted(layers)[:5]}…, "
                              "not 0..N-1")
    if cfg["hidden_size"] % int(cfg["num_attention_heads"]):
        raise CheckpointError(f"hidden size {cfg['hidden_size']} is not divisible by "
                              f"{cfg['num_attention_heads']} attention heads")
    return cfg


def longformer_config(cfg: dict):
    from transformers import LongformerConfig

    cfg = dict(cfg)
    window = cfg.pop("attention_window")
    if isinstance(window, int):
        window = [window] * int(cfg["num_hidden_layers"])
    return LongformerConfig(attention_window=list(window), **cfg)


def folder_overrides(folder: str | Path) -> dict:
    """Non-size fields from a Clinical-Longformer config.json next to the tokenizer, if any."""
    import json

    p = Path(folder) / "config.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p} is not valid JSON ({exc})") from None
    return {k: d[k] for k in _FROM_FOLDER if k in d}


def load_tokenizer(folder: str | Path):
    """Clinical-Longformer's tokenizer from a local folder (never the Hub)."""
    from transformers import RobertaTokenizer

    folder = Path(folder)
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"the Clinical-Longformer tokenizer folder {folder} lacks "
                              f"{', '.join(missing)}")
    return RobertaTokenizer.from_pretrained(str(folder), local_files_only=True)


class MerlinText(nn.Module):
    """Longformer + projection. Parameter names: ``longformer.*`` (= upstream
    ``encode_text.text_encoder.*``) and ``proj.*`` (= ``encode_text.linear_layer.*``)."""

    def __init__(self, cfg: dict, embed_dim: int = 512):
        super().__init__()
        from transformers import LongformerModel

        self.longformer = LongformerModel(longformer_config(cfg))
        self.proj = nn.Linear(int(cfg["hidden_size"]), embed_dim)
        self.tokenizer = None

    def forward(self, texts: list[str]) -> torch.Tensor:
        """(N, 512) text embeddings, not normalised."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached (MerlinText.tokenizer)")
        batch = self.tokenizer([normalise(t) for t in texts], return_tensors="pt", padding=True,
                               truncation=True, max_length=MAX_TOKENS)
        device = self.proj.weight.device
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = self.longformer(**batch).last_hidden_state[:, 0, :]
        return self.proj(hidden)

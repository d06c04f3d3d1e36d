"""A VoxTell model folder made at test time: the real ``voxtell`` network class shrunk (one
transformer layer, small decoder, query dim 32) so that the real predictor runs in well under a
second, a ``plans.json`` in nnU-Net's format and an embedding bank in the published layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PATCH = (32, 32, 32)
FEATURES = (4, 8, 8, 16, 16, 16)
STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1))
TEXT_DIM = 2560   # the bank's embedding width (Qwen3-Embedding-4B)


def tiny_network_class():
    """A subclass of the published network with small sizes (its code paths unchanged)."""
    from voxtell.model.voxtell_model import VoxTellModel

    shapes, size = {}, np.array(PATCH)
    for n, s in enumerate(STRIDES):
        size = size // np.array(s)
        shapes[n] = {"channels": FEATURES[n], "shape": tuple(int(v) for v in size)}

    class TinyVoxTell(VoxTellModel):
        TRANSFORMER_NUM_LAYERS = 1
        DECODER_CONFIGS = shapes

        def __init__(self, **kw):
            kw.update(query_dim=32, project_to_decoder_hidden_dim=32, num_heads=2)
            super().__init__(**kw)

    return TinyVoxTell


def plans() -> dict:
    n = len(FEATURES)
    return {"configurations": {"3d_fullres": {
        "patch_size": list(PATCH),
        "architecture": {
            "network_class_name": "voxtell.model.voxtell_model.VoxTellModel",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(FEATURES),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * n, "strides": [list(s) for s in STRIDES],
                "n_blocks_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1),
                "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


def make_model_dir(root: Path, seed: int = 0, extra_checkpoint: dict | None = None) -> Path:
    """``root/voxtell_v1.1/{plans.json, fold_0/checkpoint_final.pth}`` and
    ``root/embeddings/voxtell_v1.1/text_embeddings.npz`` (the Hugging Face repository's layout)."""
    import torch

    from ctlanguage.backends.voxtell_weights import build_network

    model_dir = Path(root) / "voxtell_v1.1"
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    (model_dir / "plans.json").write_text(json.dumps(plans()))
    torch.manual_seed(seed)
    net = build_network(plans(), tiny_network_class())
    sd = net.state_dict()
    # nnU-Net checkpoints carry numpy scalars and arrays besides the weights
    ckpt = {"network_weights": sd, "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres"}, "_best_ema": np.float64(0.5),
            "logging": {"train_losses": [np.array(0.25, dtype=np.float32)]},
            "inference_allowed_mirroring_axes": (0, 1, 2)}
    ckpt.update(extra_checkpoint or {})
    torch.save(ckpt, model_dir / "fold_0" / "checkpoint_final.pth")
    make_bank(Path(root) / "embeddings" / "voxtell_v1.1" / "text_embeddings.npz",
              ["body", "liver", "left lung", "right lung", "Pleural effusion", "spleen"], seed)
    return model_dir


def make_bank(path: Path, labels, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = rng.standard_normal((len(labels), TEXT_DIM)).astype(np.float16)
    np.savez(path, labels=np.array(labels), embeddings=emb)
    return path


def phantom(shape=(36, 44, 40), spacing=(1.5, 1.2, 2.0)):
    """A small CT-like volume (HU) on a RAS grid with anisotropic voxels; array [k, j, i]."""
    from ctlanguage.volume import CTVolume

    rng = np.random.default_rng(3)
    arr = np.full(shape, -1000.0, np.float32)
    k, j, i = shape
    arr[3:k - 3, 5:j - 4, 4:i - 6] = 40.0
    arr[8:20, 10:30, 6:18] = -850.0
    arr[10:26, 12:22, 20:32] = 120.0
    arr += rng.normal(0, 5, shape).astype(np.float32)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (-20.0, 15.0, -60.0)
    return CTVolume(arr, aff)


def make_text_model(path: Path) -> Path:
    """A tiny random Qwen3 text model with VoxTell's embedding width (2560) and a word-level
    tokenizer, saved like a Hub snapshot: stands in for Qwen3-Embedding-4B (8 GB)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    words = ("<pad> <unk> instruct : given an anatomical term query , retrieve the precise entity "
             "and location it represents left right kidney cyst liver lesion lung nodule").split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            padding_side="left").save_pretrained(path)
    torch.manual_seed(5)
    cfg = Qwen3Config(vocab_size=len(words), hidden_size=TEXT_DIM, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, max_position_embeddings=128)
    Qwen3Model(cfg).save_pretrained(path)
    return Path(path)

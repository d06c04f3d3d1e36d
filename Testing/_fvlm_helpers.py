"""Test helpers for the fVLM backend: a seeded chest phantom with a TotalSegmentator-style label
map, the seeded weights recipe, small model sizes and a small WordPiece vocabulary.

The parity numbers in ``data/fvlm_parity.json`` were produced once, outside this repository, by
fVLM's own code (github.com/alibaba-damo-academy/fvlm, which has no licence, so nothing of it is
here) fed with exactly these inputs: :func:`phantom` written as an LPS-stored NIfTI, a model of
:data:`VISION`/:data:`TEXT` sizes holding :func:`seeded_state` weights, and :data:`VOCAB`. The
recipe is documented in docs/backends.md ("fVLM").
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

SEED = 1234
# the reference pools with width-768 modules, so the parity model is 768 wide but shallow; 4
# blocks: the pooling reads block 3's tokens and the final norm
VISION = {"hidden": 768, "layers": 4, "heads": 12, "mlp": 64, "pool_heads": 4}
TEXT = {"vocab_size": 0, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 512, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not", ".", "emphysema", "atelectatic",
         "nodule", "pleural", "effusion", "consolidation", "cardiomegaly", "pericardial",
         "arterial", "wall", "calcification", "mass", "lung", "heart", "aorta", "##s", "##al"]
TEXT["vocab_size"] = len(VOCAB)
# TotalSegmentator 'total' class ids used by the phantom
TS = {"liver": 5, "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11,
      "lung_upper_lobe_right": 12, "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14,
      "esophagus": 15, "heart": 51, "aorta": 52, "atrial_appendage_left": 61}
SPACING_IJK = (0.875, 0.875, 2.5)     # float32-exact, so NIfTI round trips keep the sizes
SHAPE_KJI = (48, 400, 500)


def write_vocab(folder: Path) -> Path:
    """A CXR-BERT-like folder: vocab.txt and a config.json of the small text model."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(dict(TEXT, model_type="bert")), encoding="utf-8")
    return folder


def phantom():
    """(HU int16 [k, j, i], ijk_to_ras, TotalSegmentator-style labels uint8 [k, j, i]) of a chest
    stored as fVLM's files are (i toward the patient's left, j posterior, k superior)."""
    rng = np.random.default_rng(SEED)
    nk, nj, ni = SHAPE_KJI
    k, j, i = np.ogrid[:nk, :nj, :ni]
    hu = np.full(SHAPE_KJI, -1000.0)
    lab = np.zeros(SHAPE_KJI, np.uint8)
    body = np.broadcast_to(((i - 250) / 235.0) ** 2 + ((j - 200) / 185.0) ** 2 <= 1, SHAPE_KJI)
    hu[body] = 30.0

    def put(name, region, value):
        lab[region & body] = TS[name]
        hu[region & body] = value

    r_lung = ((i - 145) / 100.0) ** 2 + ((j - 195) / 152.0) ** 2 <= 1
    l_lung = ((i - 355) / 100.0) ** 2 + ((j - 195) / 150.0) ** 2 <= 1
    put("lung_lower_lobe_right", r_lung & (k < 18), -850)
    put("lung_middle_lobe_right", r_lung & (k >= 18) & (k < 30) & (j < 190), -860)
    put("lung_upper_lobe_right", r_lung & (k >= 18) & ~((k < 30) & (j < 190)) & (k < 44), -840)
    put("lung_lower_lobe_left", l_lung & (k < 22), -855)
    put("lung_upper_lobe_left", l_lung & (k >= 22) & (k < 44), -845)
    heart = ((i - 275) / 60.0) ** 2 + ((j - 150) / 55.0) ** 2 + ((k - 16) / 9.0) ** 2 <= 1
    put("heart", heart, 45)
    put("atrial_appendage_left", ((i - 330) / 12.0) ** 2 + ((j - 125) / 12.0) ** 2
        + ((k - 21) / 3.0) ** 2 <= 1, 60)
    put("aorta", (((i - 270) / 18.0) ** 2 + ((j - 270) / 18.0) ** 2 <= 1) & (k < 40), 180)
    put("esophagus", (((i - 245) / 9.0) ** 2 + ((j - 255) / 9.0) ** 2 <= 1) & (k >= 2) & (k < 42), 20)
    put("liver", (((i - 160) / 110.0) ** 2 + ((j - 190) / 110.0) ** 2 <= 1) & (k < 6), 60)
    hu += rng.normal(0.0, 25.0, SHAPE_KJI)
    affine = np.array([[-SPACING_IJK[0], 0, 0, 210.0], [0, -SPACING_IJK[1], 0, 160.0],
                       [0, 0, SPACING_IJK[2], -70.0], [0, 0, 0, 1.0]])
    return np.round(hu).astype(np.int16), affine, lab


def regions(labels) -> dict:
    """fVLM's four region masks from a TotalSegmentator-style label map."""
    parts = {"lung": [v for k, v in TS.items() if k.startswith("lung_")],
             "heart": [TS["heart"], TS["atrial_appendage_left"]],
             "esophagus": [TS["esophagus"]], "aorta": [TS["aorta"]]}
    return {o: np.isin(labels, ids) for o, ids in parts.items()}


def seeded_tensor(name: str, shape, seed: int = SEED):
    """The parity weights: N(0, 0.02) per tensor from a generator seeded by the tensor's name
    (embedding tables N(0, 1) and the text encoder's layers N(0, 0.2), so that texts differ);
    LayerNorm scales 1 + N(0, 0.02); the temperature 0.02."""
    import torch

    if name == "temp":
        return torch.tensor(0.02)
    g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    std = 1.0 if "embeddings" in name else 0.2 if name.startswith("text_encoder.encoder.") else 0.02
    t = torch.randn(tuple(shape), generator=g) * std
    if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "LayerNorm.weight")):
        t += 1.0
    return t


def seeded_state(shapes: dict, seed: int = SEED) -> dict:
    return {k: seeded_tensor(k, s, seed) for k, s in sorted(shapes.items())}


def seeded_net(vision=None, text=None):
    """Our network with the parity weights."""
    import torch

    from ctlanguage.backends.fvlm.network import FVLMNet

    net = FVLMNet(vision or VISION, text or TEXT)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    net.load_state_dict(seeded_state(shapes), strict=True)
    return net.eval().to(torch.float32)

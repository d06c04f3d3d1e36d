"""Our plain-torch encoder blocks against MONAI's: same state-dict keys, same outputs.

The image encoder used MONAI's Convolution/ResidualUnit until ``import monai`` (every submodule,
BERT included) was found to cost seconds per CLI call; model/blocks.py replaces them. These tests
build the reference with the real MONAI blocks and load the same weights into both."""

import sys
from pathlib import Path

import pytest
import torch

from ctlanguage.model import blocks, image_encoder
from ctlanguage.model.image_encoder import ImageEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # Testing/conftest.py
monai_blocks = pytest.importorskip("monai.networks.blocks")

MODEL_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "ctlanguage-synth-v2"


def _monai_conv(in_ch, out_ch, kernel_size=3, strides=1):
    return monai_blocks.Convolution(3, in_ch, out_ch, strides=strides, kernel_size=kernel_size,
                                    act="PRELU", norm="INSTANCE")


def _monai_res(in_ch, out_ch, strides=1, kernel_size=3, subunits=2):
    return monai_blocks.ResidualUnit(3, in_ch, out_ch, strides=strides, kernel_size=kernel_size,
                                     subunits=subunits, act="PRELU", norm="INSTANCE")


def _randomise(module, seed):
    """Random weights everywhere, PReLU slopes included (defaults would hide a slope mix-up)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _monai_encoder(monkeypatch, **kw):
    monkeypatch.setattr(image_encoder, "Convolution", _monai_conv)
    monkeypatch.setattr(image_encoder, "ResidualUnit", _monai_res)
    try:
        return ImageEncoder(**kw)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("in_ch,out_ch,strides,subunits", [
    (4, 16, 2, 1), (16, 16, 1, 1), (16, 32, 2, 2), (8, 12, 1, 2), (6, 6, 1, 3)])
def test_residual_unit_matches_monai(in_ch, out_ch, strides, subunits):
    ref = _monai_res(in_ch, out_ch, strides=strides, subunits=subunits)
    ours = blocks.ResidualUnit(in_ch, out_ch, strides=strides, subunits=subunits)
    assert list(ours.state_dict()) == list(ref.state_dict())
    _randomise(ref, 1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, in_ch, 12, 10, 14)
    assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("in_ch,out_ch,k,strides", [(4, 16, 3, 2), (40, 16, 3, 1), (8, 8, 1, 1)])
def test_convolution_matches_monai(in_ch, out_ch, k, strides):
    ref = _monai_conv(in_ch, out_ch, kernel_size=k, strides=strides)
    ours = blocks.Convolution(in_ch, out_ch, kernel_size=k, strides=strides)
    assert list(ours.state_dict()) == list(ref.state_dict())
    _randomise(ref, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, in_ch, 9, 8, 11)
    assert torch.equal(ours(x), ref(x))


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        blocks.Convolution(4, 4, kernel_size=2)


@pytest.mark.parametrize("stride", [1, 2])
def test_whole_encoder_matches_monai(monkeypatch, stride):
    kw = dict(channels=(8, 16, 16), dense_channels=8, embed_dim=16, feature_stride=stride,
              fine_channels=4)
    ref = _monai_encoder(monkeypatch, **kw)
    ours = ImageEncoder(**kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    _randomise(ref, 3)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, 1, 32, 16, 32)
    a, b = ours(x), ref(x)
    assert torch.equal(a.dense, b.dense) and torch.equal(a.global_embedding, b.global_embedding)


def test_shipped_checkpoint_gives_identical_outputs(monkeypatch):
    """The shipped model's image-encoder weights (trained with MONAI blocks) load strictly into
    both encoders and give bit-identical features."""
    from ctlanguage.model import ModelConfig
    from ctlanguage.model.checkpoint import load_state_dict

    if not (MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("embedded model not present")
    cfg = ModelConfig.load(MODEL_DIR / "config.json")
    state = load_state_dict(MODEL_DIR / "model.safetensors")
    enc_state = {k[len("image_encoder."):]: v for k, v in state.items()
                 if k.startswith("image_encoder.")}
    kw = dict(in_channels=cfg.in_channels, channels=cfg.encoder_channels,
              dense_channels=cfg.dense_channels, embed_dim=cfg.embed_dim,
              coord_channels=cfg.coord_channels, feature_stride=cfg.feature_stride,
              fine_channels=cfg.fine_channels)
    ref, ours = _monai_encoder(monkeypatch, **kw), ImageEncoder(**kw)
    ref.load_state_dict(enc_state, strict=True)
    ours.load_state_dict(enc_state, strict=True)
    torch.manual_seed(0)
    x = torch.rand(1, 1, 48, 32, 48)
    with torch.inference_mode():
        a, b = ours(x), ref(x)
    assert torch.equal(a.dense, b.dense) and torch.equal(a.global_embedding, b.global_embedding)
    assert a.dense.abs().sum() > 0


def test_model_import_does_not_import_monai_or_transformers():
    """The point of blocks.py: importing the model pays neither for ``import monai`` nor for
    transformers (imported only when a text has to be embedded)."""
    import subprocess

    code = ("import sys; import ctlanguage.model, ctlanguage.model.checkpoint; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'monai', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pointwise3d_is_a_1x1x1_convolution():
    """Pointwise3d keeps Conv3d's parameters and keys and gives its outputs and gradients."""
    from ctlanguage.model.blocks import Pointwise3d

    torch.manual_seed(0)
    pw = Pointwise3d(5, 7)
    conv = torch.nn.Conv3d(5, 7, 1)
    conv.load_state_dict(pw.state_dict())
    assert set(pw.state_dict()) == {"weight", "bias"} and pw.weight.shape == (7, 5, 1, 1, 1)
    x = torch.randn(2, 5, 3, 4, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    a, b = pw(x), conv(x2)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4) and torch.allclose(pw.weight.grad, conv.weight.grad, atol=1e-3)

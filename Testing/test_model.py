"""Unit tests of the grounded model on tiny random tensors (fast, CPU)."""

import pytest
import torch

from ctlanguage.model import GroundedCTModel, ModelConfig, coordinate_channels

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # Testing/conftest.py


def tiny_config(**kw):
    base = dict(encoder_channels=[8, 16, 16], dense_channels=8, embed_dim=32, pool_dim=16,
                mask_head_hidden=8, anatomies=["liver", "lung_left", "lung_right"])
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GroundedCTModel(tiny_config())


def test_shapes_and_api(model):
    x = torch.rand(2, 1, 32, 16, 32)
    f = model.encode_image(x)
    assert f.dense.shape == (2, 8, 16, 8, 16)
    assert f.global_embedding.shape == (2, 32)
    t = model.embed_text(["liver lesion", "left lung", "fluid around the right lung"])
    assert t.shape == (3, 32)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    logits = model.mask_logits(f.dense, t)
    assert logits.shape == (2, 3, 16, 8, 16)
    masks = (torch.rand(2, 3, 16, 8, 16) > 0.5).float()
    masks[1, 2] = 0  # an absent anatomy must not give NaNs
    emb = model.organ_embeddings(f.dense, masks)
    assert emb.shape == (2, 3, 32) and torch.isfinite(emb).all()
    sub = model.organ_embeddings(f.dense, masks[:, :1], anatomies=["liver"])
    assert torch.allclose(sub[:, 0], emb[:, 0], atol=1e-5)
    logit = model.presence_logit(emb[0, 0], t[:2], t[2:])
    assert logit.shape == () and torch.isfinite(logit)
    p = model.calibrated_probability(logit)
    assert 0 < float(p) < 1


def test_text_cache_and_gradients(model):
    model.embed_text(["liver lesion"])
    n = model.text_encoder.cache_size()
    model.embed_text(["liver lesion"])
    assert model.text_encoder.cache_size() == n
    # only our projection is trainable; the LM is not a sub-module
    names = [k for k, _ in model.named_parameters()]
    assert not any("bert" in k or "embeddings.word" in k for k in names)
    x = torch.rand(1, 1, 32, 16, 32)
    f = model.encode_image(x)
    t = model.embed_text(["liver"])
    model.mask_logits(f.dense, t).mean().backward()
    assert model.text_projection.mlp[0].weight.grad is not None
    assert model.image_encoder.stem.conv.weight.grad is not None
    model.zero_grad()


def test_coordinates_are_ras_ordered():
    c = coordinate_channels((4, 5, 6), "cpu", torch.float32)
    assert c.shape == (3, 4, 5, 6)
    # channel 0 (R) varies along W only, channel 2 (S) along D only
    assert torch.allclose(c[0, 0, 0], torch.linspace(-1, 1, 6))
    assert torch.allclose(c[2, :, 0, 0], torch.linspace(-1, 1, 4))


def test_full_resolution_features():
    """feature_stride=1: dense features, mask logits and organ pooling on the model grid itself."""
    torch.manual_seed(0)
    m = GroundedCTModel(tiny_config(feature_stride=1, fine_channels=4))
    f = m.encode_image(torch.rand(1, 1, 32, 16, 32))
    assert f.dense.shape == (1, 8, 32, 16, 32)
    t = m.embed_text(["liver", "left lung"])
    assert m.mask_logits(f.dense, t).shape == (1, 2, 32, 16, 32)
    emb = m.organ_embeddings(f.dense, (torch.rand(1, 3, 32, 16, 32) > 0.5).float())
    assert emb.shape == (1, 3, 32) and torch.isfinite(emb).all()


def test_direction_presence_rule_is_not_shrunk_by_close_phrasings():
    """Positive and negated phrasings embed close together; the "direction" rule scores the
    organ embedding against their normalised difference, so its logit spans +-scale."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    base = F.normalize(torch.randn(32), dim=0)
    delta = F.normalize(torch.randn(32), dim=0)
    pos = F.normalize(torch.stack([base + 0.1 * delta + 0.01 * torch.randn(32) for _ in range(3)]), dim=-1)
    neg = F.normalize(torch.stack([base - 0.1 * delta + 0.01 * torch.randn(32) for _ in range(2)]), dim=-1)
    organ = F.normalize(pos.mean(0) - neg.mean(0), dim=0)   # an organ embedding right on the axis
    m_diff = GroundedCTModel(tiny_config())
    m_dir = GroundedCTModel(tiny_config(presence_rule="direction"))
    s = float(m_dir.logit_scale)
    assert float(m_dir.presence_logit(organ, pos, neg)) == pytest.approx(s, rel=1e-4)
    assert float(m_dir.presence_logit(-organ, pos, neg)) == pytest.approx(-s, rel=1e-4)
    assert abs(float(m_diff.presence_logit(organ, pos, neg))) < 0.3 * s
    from ctlanguage.errors import CheckpointError

    with pytest.raises(CheckpointError, match="presence_rule"):
        tiny_config(presence_rule="sum").validate()


@pytest.mark.parametrize("stride", [0, 3, 4])
def test_unsupported_feature_stride_is_refused(stride):
    from ctlanguage.errors import CheckpointError

    with pytest.raises(CheckpointError, match="feature_stride"):
        tiny_config(feature_stride=stride).validate()


def test_bad_input_shapes(model):
    with pytest.raises(ValueError):
        model.encode_image(torch.rand(1, 32, 16, 32))
    with pytest.raises(ValueError):
        model.encode_image(torch.rand(1, 1, 30, 16, 32))


ORGAN_DICE_FLOOR = 0.58  # measured 0.648 (v3, seeds 9990-9991, model grid); see Resources/Models/ctlanguage-synth-v3/README.md


@pytest.mark.slow
def test_shipped_model_floor(tmp_path):
    """The embedded model on 2 fresh held-out phantom cases (seeds 9990+, never used in
    training/calibration): floors set a bit below what was measured (see its model card)."""
    from pathlib import Path

    from ctlanguage.phantom import write_corpus
    from ctlanguage.training.report import quick_eval

    model_dir = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "ctlanguage-synth-v3"
    if not (model_dir / "model.safetensors").is_file():
        pytest.skip("embedded model not present")
    write_corpus(str(tmp_path), n=2, seed=9990, montage=False)
    res = quick_eval(model_dir, tmp_path / "manifest.jsonl")
    assert res["organ_dice"]["body"] > 0.8
    assert res["mean_organ_dice"] > ORGAN_DICE_FLOOR

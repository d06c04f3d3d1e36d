"""Checkpoint round trip and refusal of corrupt / tampered / mismatched / pickled files."""

import json
import pickle

import pytest
import torch

from ctlanguage.errors import CheckpointError
from ctlanguage.model import GroundedCTModel, ModelConfig
from ctlanguage.model.checkpoint import write_sha256sums


def tiny(**kw):
    base = dict(encoder_channels=[8, 16], dense_channels=8, embed_dim=16, pool_dim=8,
                mask_head_hidden=4, anatomies=["liver", "spleen"])
    base.update(kw)
    return GroundedCTModel(ModelConfig(**base))


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(1)
    m = tiny()
    m.config.calibration_temperature = 1.7
    d = m.save_pretrained(tmp_path / "m")
    return m, d


def test_roundtrip(saved):
    m, d = saved
    assert sorted(p.name for p in d.iterdir()) == ["SHA256SUMS", "config.json", "model.safetensors"]
    m2 = GroundedCTModel.from_pretrained(d, device="cpu")
    assert m2.config.calibration_temperature == 1.7
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # overwrite keeps a model card and stays loadable
    (d / "README.md").write_text("card")
    m2.save_pretrained(d)
    assert (d / "README.md").read_text() == "card"
    GroundedCTModel.from_pretrained(d, device="cpu")


def test_tampered_weights(saved):
    _, d = saved
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        GroundedCTModel.from_pretrained(d, device="cpu")


def test_truncated_weights_even_with_matching_sums(saved):
    _, d = saved
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    write_sha256sums(d)
    with pytest.raises(CheckpointError, match="safetensors"):
        GroundedCTModel.from_pretrained(d, device="cpu")


def test_missing_sums_and_config_errors(saved):
    _, d = saved
    (d / "SHA256SUMS").unlink()
    with pytest.raises(CheckpointError, match="SHA256SUMS"):
        GroundedCTModel.from_pretrained(d, device="cpu")
    cfg = json.loads((d / "config.json").read_text())
    cfg["embed_dim"] = 32  # mismatched with the weights
    (d / "config.json").write_text(json.dumps(cfg))
    write_sha256sums(d)
    with pytest.raises(CheckpointError, match="shape"):
        GroundedCTModel.from_pretrained(d, device="cpu")
    (d / "config.json").write_text("{not json")
    write_sha256sums(d)
    with pytest.raises(CheckpointError, match="JSON"):
        GroundedCTModel.from_pretrained(d, device="cpu")
    cfg["bogus_field"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    write_sha256sums(d)
    with pytest.raises(CheckpointError, match="unknown fields"):
        GroundedCTModel.from_pretrained(d, device="cpu")


def test_pickles_refused(tmp_path, saved):
    m, _ = saved
    d = tmp_path / "pk"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        GroundedCTModel.from_pretrained(d, device="cpu")
    # a pickle renamed to model.safetensors is refused before any parsing
    m.config.save(d / "config.json")
    (d / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    write_sha256sums(d)
    with pytest.raises(CheckpointError, match="pickle"):
        GroundedCTModel.from_pretrained(d, device="cpu")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        GroundedCTModel.from_pretrained(tmp_path / "nope")

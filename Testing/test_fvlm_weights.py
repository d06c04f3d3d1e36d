"""fVLM weights: the one weights_only read of the published checkpoint layout ({"model": state
dict, optimizer state, ...}), the unused text-encoder tensors dropped and counted, foreign /
missing / mis-shaped tensors and code-running pickles refused, conversion to a safetensors folder
with the sha256 recorded, the user's confirmation of the terms, and the CLI (`models download
fvlm`, `models list`, `query --model fvlm`): every failure one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

import _fvlm_helpers as H
from ctlanguage import catalog
from ctlanguage.backends import backend_module
from ctlanguage.backends.fvlm import NEEDS_ANATOMY, WEIGHTS_HINT
from ctlanguage.backends.fvlm import backend as B
from ctlanguage.backends.fvlm import weights as W
from ctlanguage.cli import main
from ctlanguage.errors import CheckpointError

SMALL = {"hidden": 24, "layers": 4, "heads": 12, "mlp": 16, "pool_heads": 4}


def _upstream_state() -> dict:
    shapes = W.expected_shapes(SMALL, H.TEXT)
    sd = H.seeded_state(shapes)
    # what the published file carries besides: MLM head, BERT buffers, token-type table
    sd["text_encoder.cls.predictions.bias"] = torch.zeros(H.TEXT["vocab_size"])
    sd["text_encoder.cls.predictions.decoder.weight"] = sd["text_encoder.embeddings.word_embeddings.weight"]
    sd["text_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    sd["text_encoder.embeddings.token_type_embeddings.weight"] = torch.ones(2, H.TEXT["hidden_size"])
    return sd


def _save(path, sd, **extra):
    torch.save({"model": sd, "epoch": 9, "config": {"model": {"arch": "blip_pretrain_vit"}},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]},
                **extra}, path)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CTLANGUAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(W.TERMS_ENV, raising=False)
    return tmp_path


@pytest.fixture
def files(env):
    return _save(env / "fvlm.pth", _upstream_state()), H.write_vocab(env / "cxr-bert")


def test_convert_records_the_hash_drops_unused_and_loads(env, files):
    pt, tok = files
    dest = env / "converted"
    cfg = W.convert(pt, tok, dest, accept_terms=True)
    assert cfg["source"]["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    assert cfg["source"]["sha256_from"] == "computed at conversion"
    assert cfg["dropped_unused"]["count"] == 4 and cfg["terms_accepted"]
    assert cfg["vision_config"] == SMALL and cfg["text_config"]["num_attention_heads"] == 2
    assert (dest / "tokenizer" / "vocab.txt").is_file()
    summary = catalog.verify_model_dir(dest)
    assert summary["tensors"] == len(W.expected_shapes(SMALL, H.TEXT))
    be = B.load_folder(dest, device="cpu")
    got = be.net.state_dict()
    want = H.seeded_state(W.expected_shapes(SMALL, H.TEXT))
    for name in ("visual_encoder.blocks.3.attn.qkv.weight", "query_tokens", "temp",
                 "text_encoder.encoder.layer.1.output.dense.weight", "vision_projs.2.bias"):
        assert torch.equal(got[name], want[name]), name
    # the token-type table of the file is not used: texts embed as without it
    ids = torch.tensor([[2, 7, 6, 3]])
    emb = be.net.text_encoder.embeddings(input_ids=ids)
    word = want["text_encoder.embeddings.word_embeddings.weight"][ids[0]]
    pos = want["text_encoder.embeddings.position_embeddings.weight"][:4]
    ln = torch.nn.functional.layer_norm(word + pos, (64,), want["text_encoder.embeddings.LayerNorm.weight"],
                                        want["text_encoder.embeddings.LayerNorm.bias"], 1e-12)
    assert torch.allclose(emb[0], ln, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"visual_encoder.head.weight": torch.zeros(2, 24)}), "not fVLM's"),
    (lambda sd: sd.pop("vision_projs.3.weight"), "lacks 1 of fVLM's tensors"),
    (lambda sd: sd.update({"text_proj.bias": torch.zeros(255)}), "has shape (255,)"),
    (lambda sd: sd.update({"visual_encoder.blocks.7.norm1.weight": torch.ones(24)}), "not 0..N-1"),
])
def test_foreign_missing_or_misshaped_tensors_are_refused(env, files, change, message):
    _, tok = files
    sd = _upstream_state()
    change(sd)
    pt = _save(env / "bad.pth", sd)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        W.convert(pt, tok, env / "out", accept_terms=True)
    assert not (env / "out").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_code_running_pickle_is_refused_unrun(env, files):
    _, tok = files
    marker = env / "ran"
    pt = env / "evil.pth"
    torch.save({"model": {"temp": torch.tensor(0.07)}, "x": _Payload(str(marker))}, pt)
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        W.convert(pt, tok, env / "out", accept_terms=True)
    assert not marker.exists() and not (env / "out").exists()
    pt.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError):
        W.convert(pt, tok, env / "out", accept_terms=True)


def test_the_terms_must_be_confirmed(env, files, monkeypatch):
    pt, tok = files
    with pytest.raises(CheckpointError, match="no licence file.*--accept-licence"):
        W.convert(pt, tok, env / "out")
    assert not (env / "out").exists()
    monkeypatch.setenv(W.TERMS_ENV, "1")
    W.convert(pt, tok, env / "out")
    monkeypatch.delenv(W.TERMS_ENV)
    B.load_folder(env / "out", device="cpu")
    # a converted folder without the confirmation (copied from elsewhere) does not load
    cfg = json.loads((env / "out" / "config.json").read_text())
    del cfg["terms_accepted"]
    (env / "out" / "config.json").write_text(json.dumps(cfg))
    sums = [f"{catalog.sha256_file(env / 'out' / n)}  {n}" for n in (catalog.WEIGHTS, catalog.CONFIG)]
    (env / "out" / catalog.SUMS).write_text("\n".join(sums) + "\n")
    with pytest.raises(CheckpointError, match="CTLANGUAGE_ACCEPT_FVLM_TERMS"):
        B.load_folder(env / "out", device="cpu")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_download_list_and_query(env, files, capsys):
    from _export_helpers import synthetic_volume
    from ctlanguage.io import write_volume

    pt, tok = files
    entry = catalog.find_entry("fvlm")
    assert entry.backend == "fvlm" and "non-commercial" in entry.license
    assert not backend_module("fvlm").describe(entry).weights_present
    img = env / "ct.nii.gz"
    write_volume(synthetic_volume((12, 20, 24)), img)
    out = env / "out"
    # no weights: one sentence saying how to get them
    assert main(["--quiet", "query", str(img), "-p", "emphysema", "--out", str(out), "--model", "fvlm"]) == 2
    assert "Google Drive" in _one_line(capsys) and not out.exists()
    for flags in ([], ["--accept-licence"]):
        assert main(["--quiet", "models", "download", "fvlm", *flags]) == 2
        assert _one_line(capsys) == f"error: {WEIGHTS_HINT}"
    assert main(["--quiet", "models", "download", "fvlm", "--from", str(pt), "--tokenizer", str(tok)]) == 2
    assert "no licence file" in _one_line(capsys)
    assert not (env / "cache" / "models" / "fvlm").exists()
    assert main(["--quiet", "models", "download", "merlin", "--accept-licence"]) == 2
    assert "--accept-licence applies" in _one_line(capsys)
    assert main(["--quiet", "models", "download", "fvlm", "--from", str(pt), "--tokenizer", str(tok),
                 "--accept-licence"]) == 0
    assert backend_module("fvlm").describe(entry).weights_present
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    row = rows["fvlm"]
    assert row["available"] and row["capabilities"] == ["scores (uncalibrated)"]
    assert row["device"] == "cpu" and row["download_size"].startswith("~0.8 GB")
    assert rows["totalseg+fvlm"]["pipeline"] == {"anatomy": "totalseg", "masks": "fvlm", "scores": "fvlm"}
    assert main(["models", "verify", "fvlm"]) == 0
    capsys.readouterr()
    # alone, it says in one sentence that it needs an anatomy backend
    assert main(["--quiet", "query", str(img), "-p", "emphysema", "--out", str(out), "--model", "fvlm"]) == 2
    assert _one_line(capsys) == f"error: {NEEDS_ANATOMY}" and not out.exists()
    # a converted folder that was altered is refused
    w = catalog.cached_model_dir(entry) / catalog.WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert main(["models", "verify", "fvlm"]) == 2
    assert "fvlm" in _one_line(capsys)

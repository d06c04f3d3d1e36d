"""Merlin weights: download from a 127.0.0.1 server (progress, Range resume, size/sha256 checks,
hash recorded when the catalog has none), the single weights_only read of the pickle, refusal of
non-tensor payloads and code-running pickles, conversion to a safetensors model folder, the CLI
path (`ctlanguage models download merlin`) and the one-sentence hint when weights are absent.

The served checkpoint has every upstream name and shape of a Merlin checkpoint with a 2-layer
text encoder; its tensors are broadcast scalars, so the pickle is a few hundred KB."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import pytest
import torch

import _merlin_helpers as H
from ctlanguage import catalog
from ctlanguage.backends import backend_module
from ctlanguage.backends.merlin import backend, text, weights
from ctlanguage.cli import main
from ctlanguage.errors import CheckpointError, CTLanguageError
from test_catalog import _Handler, env, server  # noqa: F401  (the shared local server)


@pytest.fixture(scope="module")
def longformer(tmp_path_factory):
    return H.tiny_longformer_folder(tmp_path_factory.mktemp("merlin-w") / "clinical-longformer")


@pytest.fixture(scope="module")
def fake(longformer):
    """(pickle bytes, {our name: constant}) of an upstream-named Merlin checkpoint."""
    tok = text.load_tokenizer(longformer)
    cfg = dict(text.CLINICAL_LONGFORMER) | text.folder_overrides(longformer)
    cfg |= {k: H.TINY_TEXT[k] for k in ("intermediate_size", "max_position_embeddings", "type_vocab_size")}
    cfg |= {"vocab_size": len(tok), "num_hidden_layers": H.TINY_TEXT["num_hidden_layers"]}
    inverse = {v: k for k, v in weights.PREFIXES.items()}
    sd, consts = {}, {}
    for i, (name, shape) in enumerate(sorted(weights.expected_shapes(cfg).items())):
        prefix = next((p for p in inverse if name.startswith(p)), None)
        up = inverse[prefix] + name[len(prefix):] if prefix else name
        if name.endswith("num_batches_tracked"):
            sd[up] = torch.zeros((), dtype=torch.long).expand(shape)
        else:
            consts[name] = (i % 97) / 1000.0
            sd[up] = torch.full((), consts[name]).expand(shape)
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue(), consts


def _entry(url, data, sha=None, size=None, version="t1"):
    return catalog.ModelEntry(id="merlin", version=version, url=url + "/merlin.pt", sha256=sha,
                              size=len(data) if size is None else size, license="MIT", backend="merlin",
                              extra={"tokenizer_url": url + "/tok"})


def _serve(h, data, longformer):
    h.files["/merlin.pt"] = data
    for name in ("vocab.json", "merges.txt", "config.json"):
        h.files[f"/tok/{name}"] = (longformer / name).read_bytes()


def test_download_resumes_checks_converts_and_records_the_hash(env, server, fake, longformer):
    url, h = server
    data, consts = fake
    assert len(data) < 2 << 20
    _serve(h, data, longformer)
    entry = _entry(url, data)
    h.cut_after = len(data) // 2                       # the first connection dies half way
    with pytest.raises(CTLanguageError, match="interrupted"):
        weights.download(entry)
    part = env / "downloads" / "merlin-t1.pt.part"
    have = part.stat().st_size
    assert 0 < have < len(data)
    seen = []
    d = weights.download(entry, progress=lambda done, total, msg: seen.append((done, total)))
    assert ("/merlin.pt", f"bytes={have}-") in h.log
    assert seen[-1] == (len(data), len(data)) or any(t == len(data) for _, t in seen)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert cfg["source"]["sha256_from"] == "computed at conversion"
    assert catalog.verify_model_dir(d, entry)["tensors"] == len(consts) + sum(
        1 for k in weights.expected_shapes(cfg["text_config"]) if k.endswith("num_batches_tracked"))
    assert not any((env / "downloads").iterdir())     # the pickle and tokenizer files are gone
    from safetensors.torch import load_file

    stored = load_file(str(d / "model.safetensors"))
    for name in ("image.conv1.weight", "image.layer4.2.bn3.running_var", "text.proj.weight",
                 "text.longformer.encoder.layer.1.attention.self.query.weight", "logit_scale"):
        assert torch.all(stored[name] == consts[name]), name
    assert {p.name for p in (d / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    n = len(h.log)
    assert weights.download(entry) == d and len(h.log) == n   # cached: nothing fetched again
    # the registry's module is this one and now reports the weights present
    assert backend_module("merlin").describe(entry).weights_present


def test_wrong_hash_or_size_is_refused_and_the_download_deleted(env, server, fake, longformer):
    url, h = server
    data, _ = fake
    _serve(h, data, longformer)
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        weights.download(_entry(url, data, sha="0" * 64))
    with pytest.raises(CheckpointError, match=f"has {len(data):,} bytes, expected {len(data) + 1:,}"):
        weights.download(_entry(url, data, size=len(data) + 1, version="t2"))
    assert not list((env / "downloads").glob("*.pt*"))
    assert not (env / "models" / "merlin").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_non_tensor_and_code_running_pickles_are_refused(tmp_path, longformer):
    torch.save({"encode_image.i3_resnet.conv1.weight": torch.zeros(1), "note": "hello"}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="non-tensor entries"):
        weights.convert(tmp_path / "mixed.pt", longformer, tmp_path / "out")
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": _Payload(str(marker))}))
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        weights.convert(tmp_path / "evil.pt", longformer, tmp_path / "out")
    assert not marker.exists()
    (tmp_path / "list.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        weights.read_checkpoint(tmp_path / "list.pt")
    assert not (tmp_path / "out").exists()


def test_cli_downloads_lists_verifies_and_takes_a_local_copy(tmp_path, env, server, fake, longformer, capsys):
    url, h = server
    data, _ = fake
    _serve(h, data, longformer)
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps({"models": [_entry(url, data).to_dict()]}))
    assert main(["--quiet", "models", "--catalog", str(cat), "download", "merlin"]) == 0
    assert main(["models", "--catalog", str(cat), "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["id"] == "merlin" and listed[0]["status"] == "weights present" and listed[0]["available"]
    assert main(["--quiet", "models", "--catalog", str(cat), "verify", "merlin"]) == 0
    # a copy the user already has (--from) plus a local tokenizer folder: nothing is fetched
    (tmp_path / "mine.pt").write_bytes(data)
    n = len(h.log)
    assert main(["--quiet", "models", "--catalog", str(cat), "download", "merlin", "--force",
                 "--from", str(tmp_path / "mine.pt"), "--tokenizer", str(longformer)]) == 0
    assert len(h.log) == n and (tmp_path / "mine.pt").is_file()   # the user's file is kept
    # a bad local copy: one line, exit 2, the cached model untouched
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    capsys.readouterr()
    assert main(["--quiet", "models", "--catalog", str(cat), "download", "merlin", "--force",
                 "--from", str(tmp_path / "bad.pt"), "--tokenizer", str(longformer)]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (env / "models" / "merlin" / "t1" / "model.safetensors").is_file()


def test_missing_weights_give_the_download_command(env):
    entry = catalog.ModelEntry(id="merlin", version="t9", url="http://127.0.0.1:9/x.pt", license="MIT",
                               backend="merlin")
    caps = backend_module("merlin").describe(entry)
    assert caps.scores and not caps.calibrated and not caps.weights_present
    assert "ctlanguage models download merlin" in caps.weights_hint
    with pytest.raises(CheckpointError, match="ctlanguage models download merlin"):
        backend_module("merlin").load(entry)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_requested_without_one_is_a_clear_error():
    with pytest.raises(CTLanguageError, match="no CUDA GPU"):
        backend.pick_device("cuda")
    assert str(backend.pick_device(None)) == "cpu"


def test_shipped_catalog_lists_merlin_with_its_facts(env):
    e = catalog.find_entry("merlin")
    assert e is not None and e.backend == "merlin" and e.license == "MIT"
    assert e.size == 1_084_889_630
    assert e.url.endswith("/stanfordmimi/Merlin/resolve/main/"
                          "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt")
    assert e.extra["tokenizer_url"].endswith("/yikuan8/Clinical-Longformer/resolve/main")
    assert backend_module(e.backend).describe(e).weights_present is False   # empty test cache

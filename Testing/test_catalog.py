"""Model catalog: shipped catalog.json, resolution order (path > embedded > cache), downloads from
a local HTTP server on 127.0.0.1 (progress, Range resume, sha256), refusal of bad checkpoints."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import zipfile
from pathlib import Path

import pytest

import _fake_engine
from ctlanguage import catalog
from ctlanguage.cli import main
from ctlanguage.errors import CheckpointError, CTLanguageError

REQUIRED = {"id", "version", "license", "description", "url", "sha256", "size", "text_encoder",
            "intended_use", "metrics"}


# ------------------------------------------------------------------------------- local server

class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    log: list = []
    cut_after: int | None = None     # close the connection after this many bytes (once)
    ignore_range = False

    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802
        data = self.files.get(self.path)
        rng = self.headers.get("Range")
        type(self).log.append((self.path, rng))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not self.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = type(self).cut_after
        if cut is not None:
            type(self).cut_after = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    _Handler.files, _Handler.log, _Handler.cut_after, _Handler.ignore_range = {}, [], None, False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CTLANGUAGE_CACHE", str(cache))
    return cache


def _model_zip(tmp_path: Path, model_id="remote-model", extra=b"") -> tuple[bytes, str]:
    d = _fake_engine.make_fake_model_dir(tmp_path / f"src-{model_id}", model_id=model_id)
    z = tmp_path / f"{model_id}.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(d.iterdir()):
            zf.write(p, f"{model_id}/{p.name}")
        if extra:
            zf.writestr(f"{model_id}/padding.bin", extra)
    w = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    return z.read_bytes(), w


def _entry(url, data, weights_sha, model_id="remote-model"):
    return catalog.ModelEntry(id=model_id, version="2.0", url=url, sha256=hashlib.sha256(data).hexdigest(),
                              size=len(data), weights_sha256=weights_sha, license="Apache-2.0")


# ------------------------------------------------------------------------------- shipped catalog

def test_shipped_catalog_has_required_fields_and_embedded_default_first():
    entries = json.loads(Path(catalog.catalog_path()).read_text())["models"]
    assert entries and entries[0]["embedded"] is True
    for e in entries:
        if e.get("backend", "grounded") == "grounded" and not e.get("pipeline"):
            assert REQUIRED <= set(e), REQUIRED - set(e)
        else:   # other families fetch their own weights: no url/sha256 of ours
            need = {"id", "version", "license", "description", "intended_use"}
            assert need <= set(e), need - set(e)
    first = catalog.load_catalog()[0]
    assert catalog.default_entry().id == first.id


def test_shipped_embedded_model_matches_catalog_when_present():
    entry = catalog.default_entry()
    d = catalog.embedded_model_dir(entry)
    if not (d / "model.safetensors").is_file():
        pytest.skip("embedded model not built yet")
    try:
        catalog.verify_model_dir(d, entry)
    except CheckpointError as exc:
        pytest.fail(f"{exc} -- after retraining run `python -m ctlanguage.catalog --update-embedded`")


# ------------------------------------------------------------------------------- resolution

def test_resolution_order_path_then_embedded_then_cache(tmp_path, env, monkeypatch):
    res = tmp_path / "res"
    emb = _fake_engine.make_fake_model_dir(res / "Models" / "emb-model", model_id="emb-model")
    (res / "catalog.json").write_text(json.dumps({"models": [
        {"id": "emb-model", "version": "1", "embedded": True, "path": "Models/emb-model",
         "url": "embedded:Models/emb-model"},
        {"id": "remote-model", "version": "2.0", "url": "http://127.0.0.1:9/x.zip", "sha256": "0" * 64}]}))
    monkeypatch.setenv("CTLANGUAGE_RESOURCES", str(res))
    explicit = _fake_engine.make_fake_model_dir(tmp_path / "mine")
    assert catalog.resolve_model(str(explicit))[0] == explicit
    assert catalog.resolve_model(str(explicit / "model.safetensors"))[0] == explicit
    assert catalog.resolve_model("default")[0] == emb
    assert catalog.resolve_model("emb-model")[0] == emb
    with pytest.raises(CheckpointError, match="models download remote-model"):
        catalog.resolve_model("remote-model")
    cached = _fake_engine.make_fake_model_dir(env / "models" / "remote-model" / "2.0", model_id="remote-model")
    assert catalog.resolve_model("remote-model")[0] == cached
    with pytest.raises(CTLanguageError, match="unknown model"):
        catalog.resolve_model("nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        catalog.resolve_model(str(tmp_path / "missing-folder"))


def test_cache_env_var_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("CTLANGUAGE_CACHE", str(tmp_path / "c"))
    assert catalog.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CTLANGUAGE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert catalog.cache_dir() == Path.home() / ".cache" / "ctlanguage"


# ------------------------------------------------------------------------------- download

def test_download_verifies_and_unpacks_with_progress(tmp_path, env, server):
    url, h = server
    data, wsha = _model_zip(tmp_path)
    h.files["/m.zip"] = data
    entry = _entry(url + "/m.zip", data, wsha)
    seen = []
    d = catalog.download(entry, progress=lambda done, total, msg: seen.append((done, total)))
    assert d == env / "models" / "remote-model" / "2.0"
    assert catalog.verify_model_dir(d, entry)["weights_sha256"] == wsha
    assert seen[-1] == (len(data), len(data))
    assert not list((env / "downloads").iterdir())  # archive and .part removed
    # second call: nothing downloaded again
    n = len(h.log)
    catalog.download(entry)
    assert len(h.log) == n


def test_download_resumes_with_http_range(tmp_path, env, server):
    url, h = server
    data, wsha = _model_zip(tmp_path, extra=bytes(range(256)) * 400)
    h.files["/m.zip"] = data
    entry = _entry(url + "/m.zip", data, wsha)
    h.cut_after = len(data) // 3  # the first connection dies a third of the way
    with pytest.raises(CTLanguageError, match="interrupted"):
        catalog.download(entry, chunk=4096)
    part = env / "downloads" / "remote-model-2.0.zip.part"
    assert part.is_file() and 0 < part.stat().st_size < len(data)
    have = part.stat().st_size
    d = catalog.download(entry, chunk=4096)
    assert h.log[-1] == ("/m.zip", f"bytes={have}-")
    assert (d / "model.safetensors").is_file()


def test_download_restarts_when_server_ignores_range(tmp_path, env, server):
    url, h = server
    data, wsha = _model_zip(tmp_path)
    h.files["/m.zip"] = data
    h.ignore_range = True
    entry = _entry(url + "/m.zip", data, wsha)
    (env / "downloads").mkdir(parents=True)
    (env / "downloads" / "remote-model-2.0.zip.part").write_bytes(b"garbage-prefix")
    d = catalog.download(entry)
    assert (d / "model.safetensors").is_file()


def test_download_with_wrong_sha256_is_refused_and_deleted(tmp_path, env, server):
    url, h = server
    data, wsha = _model_zip(tmp_path)
    h.files["/m.zip"] = data[:-1] + bytes([data[-1] ^ 1])  # tampered in transit
    entry = _entry(url + "/m.zip", data, wsha)
    with pytest.raises(CheckpointError, match="does not match the catalog's sha256"):
        catalog.download(entry)
    assert not list((env / "downloads").iterdir())
    assert not (env / "models" / "remote-model" / "2.0").exists()


def test_download_with_mismatched_weights_is_refused(tmp_path, env, server):
    url, h = server
    data, _ = _model_zip(tmp_path)
    h.files["/m.zip"] = data
    entry = _entry(url + "/m.zip", data, "f" * 64)  # archive ok, weights are not the catalog's
    with pytest.raises(CheckpointError, match="catalog's sha256"):
        catalog.download(entry)
    assert not (env / "models" / "remote-model" / "2.0").exists()


def test_download_http_error_and_unreachable(tmp_path, env, server):
    url, _ = server
    entry = catalog.ModelEntry(id="x", version="1", url=url + "/missing.zip", sha256="0" * 64)
    with pytest.raises(CTLanguageError, match="HTTP 404"):
        catalog.download(entry)
    entry.url = "http://127.0.0.1:9/none.zip"
    with pytest.raises(CTLanguageError, match="download of"):
        catalog.download(entry, timeout=2)


def test_zip_with_unsafe_paths_is_refused(tmp_path, env, server):
    url, h = server
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../evil.txt", "x")
    data = z.read_bytes()
    h.files["/e.zip"] = data
    entry = catalog.ModelEntry(id="evil", version="1", url=url + "/e.zip",
                               sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(CheckpointError, match="unsafe path"):
        catalog.download(entry)
    assert not (env / "models" / "evil.txt").exists() and not (env / "evil.txt").exists()


def test_cli_models_download_list_verify(tmp_path, env, server, capsys):
    url, h = server
    data, wsha = _model_zip(tmp_path)
    h.files["/m.zip"] = data
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps({"models": [_entry(url + "/m.zip", data, wsha).to_dict()]}))
    assert main(["--quiet", "models", "--catalog", str(cat), "download", "remote-model"]) == 0
    assert main(["models", "--catalog", str(cat), "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["status"] == "cached"
    assert main(["--quiet", "models", "--catalog", str(cat), "verify"]) == 0
    # tamper with the cached weights: verify must refuse with a clear message
    w = env / "models" / "remote-model" / "2.0" / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 0xFF
    w.write_bytes(bytes(b))
    capsys.readouterr()
    assert main(["--quiet", "models", "--catalog", str(cat), "verify"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "sha256" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- structure checks

@pytest.mark.parametrize("damage,needle", [
    ("truncate", "truncated"), ("not_safetensors", "not a safetensors"), ("pickle", "pickle"),
    ("bad_config", "not valid JSON"), ("sums", "does not match its sha256"), ("no_weights", "no model.safetensors"),
])
def test_verify_refuses_damaged_model_folders(tmp_path, damage, needle):
    d = _fake_engine.make_fake_model_dir(tmp_path / "m")
    w = d / "model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-10])
    elif damage == "not_safetensors":
        w.write_bytes(b"\xff" * 64)
    elif damage == "pickle":
        w.write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    elif damage == "bad_config":
        (d / "config.json").write_text("{not json")
    elif damage == "sums":
        (d / "config.json").write_text(json.dumps({"model_id": "fake-model", "version": "9"}))
    else:
        w.unlink()
    with pytest.raises(CheckpointError, match=needle):
        catalog.verify_model_dir(d)


def test_verify_refuses_model_id_mismatch(tmp_path):
    d = _fake_engine.make_fake_model_dir(tmp_path / "m", model_id="other")
    entry = catalog.ModelEntry(id="expected", version="1")
    with pytest.raises(CheckpointError, match="describes model 'other'"):
        catalog.verify_model_dir(d, entry)

"""Model catalog, per-user weight cache and verified downloads.

Where weights come from (first match wins), see :func:`resolve_model`:
  1. an explicit path to a model folder (config.json + model.safetensors + SHA256SUMS);
  2. the embedded default shipped in ``Resources/Models/<id>/`` (works offline);
  3. the per-user cache ``$CTLANGUAGE_CACHE`` (default ``~/.cache/ctlanguage``), filled by
     :func:`download` — HTTP with progress, resume via ``Range`` and sha256 verification.

Catalog entries (``Resources/catalog.json``, embedded default first)::

  {"id", "version", "license", "description", "url", "sha256", "size", "text_encoder",
   "intended_use", "metrics", "embedded", "path", "weights_sha256"}

``url``/``sha256``/``size`` describe the file to download (a .zip or .tar.gz of the model folder);
for an embedded model ``url`` is ``embedded:<path below Resources>`` and ``sha256``/``size``
describe its ``model.safetensors``. ``weights_sha256`` is always the sha256 of model.safetensors.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, CTLanguageError

CACHE_ENV = "CTLANGUAGE_CACHE"
CATALOG_ENV = "CTLANGUAGE_CATALOG"
DEFAULT_ALIASES = ("default", "embedded", "")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SUMS = "SHA256SUMS"

ProgressFn = Callable[[int, int | None, str], None]  # (bytes done, total or None, message)


@dataclass
class ModelEntry:
    id: str
    version: str
    license: str = ""
    description: str = ""
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    text_encoder: str | None = None
    intended_use: str = ""
    metrics: dict = field(default_factory=dict)
    embedded: bool = False
    path: str | None = None
    weights_sha256: str | None = None
    backend: str = "grounded"           # model family (ctlanguage.backends.REGISTRY)
    pipeline: dict | None = None        # composed entry: {"anatomy": ID, "masks": ID, "scores": ID}
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelEntry":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        if not d.get("id") or not d.get("version"):
            raise CTLanguageError(f"catalog entry without id/version: {d!r:.80}")
        kw = {k: v for k, v in d.items() if k in known}
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


# ----------------------------------------------------------------------------- catalog file

def catalog_path() -> Path:
    env = os.environ.get(CATALOG_ENV)
    if env:
        return Path(env)
    from .resources import resources_dir

    return resources_dir() / "catalog.json"


def load_catalog(path: str | Path | None = None) -> list[ModelEntry]:
    p = Path(path) if path else catalog_path()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CTLanguageError(f"model catalog {p} not found") from None
    except (OSError, ValueError) as exc:
        raise CTLanguageError(f"model catalog {p} is not valid JSON ({exc})") from None
    models = data.get("models") if isinstance(data, dict) else data
    if not isinstance(models, list):
        raise CTLanguageError(f"model catalog {p} has no 'models' list")
    return [ModelEntry.from_dict(m) for m in models]


def find_entry(model_id: str, catalog: list[ModelEntry] | None = None) -> ModelEntry | None:
    catalog = catalog if catalog is not None else load_catalog()
    if model_id in DEFAULT_ALIASES:
        for e in catalog:
            if e.embedded:
                return e
        return catalog[0] if catalog else None
    for e in catalog:
        if e.id == model_id or f"{e.id}@{e.version}" == model_id:
            return e
    return None


def default_entry(catalog: list[ModelEntry] | None = None) -> ModelEntry:
    e = find_entry("default", catalog)
    if e is None:
        raise CTLanguageError("the model catalog lists no models")
    return e


# ----------------------------------------------------------------------------- folders

def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctlanguage"


def cached_model_dir(entry: ModelEntry) -> Path:
    return cache_dir() / "models" / entry.id / entry.version


def embedded_model_dir(entry: ModelEntry) -> Path:
    from .resources import resources_dir

    rel = entry.path or f"Models/{entry.id}"
    return resources_dir() / rel


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- verification

def verify_model_dir(path: str | Path, entry: ModelEntry | None = None) -> dict:
    """Check a model folder without loading the network: files present, no pickles, and what
    loading checks before it builds the network (config.json a valid ModelConfig, SHA256SUMS
    present and matching), safetensors header readable, catalog hash match. Returns a summary.
    Raises CheckpointError with a specific message otherwise."""
    from .model.checkpoint import verify_checksums
    from .model.config import ModelConfig

    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"model folder {d} does not exist")
    w, c = d / WEIGHTS, d / CONFIG
    if not w.is_file():
        pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if pickles:
            raise CheckpointError(f"{d} holds only a pickled checkpoint ({pickles[0]}); "
                                  "CTLanguage loads model.safetensors only")
        raise CheckpointError(f"model folder {d} has no {WEIGHTS}")
    if not c.is_file():
        raise CheckpointError(f"model folder {d} has no {CONFIG}")
    try:
        config = json.loads(c.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{c} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{c} does not hold a JSON object")
    n_tensors = _check_safetensors_header(w)
    verify_checksums(d)          # the same checks as loading (model/checkpoint.py)
    if config.get("backend", "grounded") == "grounded":   # other families check their own config
        ModelConfig.from_dict(config)
    weights_sha = sha256_file(w)
    expected = entry.weights_sha256 if entry is not None else None
    if expected and expected.lower() != weights_sha:
        raise CheckpointError(
            f"{w} does not match the catalog's sha256 for {entry.id} {entry.version} (expected "
            f"{expected[:12]}…, got {weights_sha[:12]}…): wrong version, corrupt or modified")
    cfg_id = config.get("model_id") or config.get("id") or config.get("name")
    if entry is not None and cfg_id and cfg_id != entry.id:
        raise CheckpointError(f"{c} describes model {cfg_id!r}, but the catalog entry is {entry.id!r}")
    return {"path": str(d), "weights_sha256": weights_sha, "tensors": n_tensors,
            "size": w.stat().st_size, "config_id": cfg_id}


def _check_safetensors_header(path: Path) -> int:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(f"{path} is a pickled file, not safetensors; refusing to load it")
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({len(head)} bytes)")
        n = int.from_bytes(head, "little")
        size = path.stat().st_size
        if n <= 1 or n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    end = 8 + n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for k, v in tensors.items():
        try:
            lo, hi = v["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} has a malformed entry for tensor {k}") from None
        if end + hi > size:
            raise CheckpointError(f"{path} is truncated (tensor {k} runs past the end of the file)")
    return len(tensors)


# ----------------------------------------------------------------------------- resolution

def resolve_model(spec: str | os.PathLike | None = "default", *,
                  catalog: list[ModelEntry] | None = None) -> tuple[Path | None, ModelEntry | None]:
    """Model folder for ``spec`` (explicit path, 'default', catalog id or id@version); None for
    pipelines and non-grounded families, whose backends locate their own weights.

    Raises CheckpointError when the model is known but not available locally (with the command
    that downloads it) and CTLanguageError when the id is unknown."""
    s = "default" if spec is None else str(spec)
    p = Path(s).expanduser()
    if s not in DEFAULT_ALIASES and (p.exists() or os.sep in s or s.startswith(".")):
        if p.is_file():  # a weights file: use its folder
            p = p.parent
        if not p.is_dir():
            raise CheckpointError(f"model folder {p} does not exist")
        return p, None
    catalog = catalog if catalog is not None else load_catalog()
    entry = find_entry(s, catalog)
    if entry is None:
        known = ", ".join(e.id for e in catalog) or "none"
        raise CTLanguageError(f"unknown model {s!r}; known models: {known} (or give a folder path)")
    if entry.pipeline or (entry.backend or "grounded") != "grounded":
        return None, entry   # pipelines and other families find their weights themselves
    if entry.embedded:
        d = embedded_model_dir(entry)
        if d.is_dir():
            return d, entry
        if (entry.url or "").startswith("embedded:") or not entry.url:
            raise CheckpointError(
                f"the embedded model {entry.id} is missing: {d} does not exist (incomplete install?)")
    d = cached_model_dir(entry)
    if (d / WEIGHTS).is_file():
        return d, entry
    raise CheckpointError(
        f"model {entry.id} {entry.version} is not downloaded yet; run "
        f"`ctlanguage models download {entry.id}` (cache: {cache_dir()})")


# ----------------------------------------------------------------------------- download

ALLOW_DOWNLOADS_ENV = "CTLANGUAGE_ALLOW_DOWNLOADS"   # the user's consent for packages that fetch weights


def allow_downloads() -> None:
    """Record the user's consent (CLI --allow-download, the Slicer question) for this process and
    its children: backends whose packages download their own weights read it."""
    os.environ[ALLOW_DOWNLOADS_ENV] = "1"


def fetchable(entry: ModelEntry) -> bool:
    """Whether CTLanguage itself can download this entry's weights (:func:`fetch`)."""
    kind = entry.backend or "grounded"
    if entry.pipeline:
        return False
    if kind == "grounded":
        return bool(entry.url) and not entry.embedded
    from .backends import backend_module

    if not entry.url:         # the user brings the file (fVLM: `models download fvlm --from FILE`)
        return False
    try:
        return callable(getattr(backend_module(kind), "download", None))
    except CTLanguageError:   # an optional family that is not installed
        return False


def fetch(entry: ModelEntry, *, progress: ProgressFn | None = None, force: bool = False, **local) -> Path:
    """Get an entry's weights the way its family does (one path for the CLI and Slicer): our
    verified archive download for grounded models, else the family's own ``download`` (e.g.
    Merlin: published pickle -> safetensors; ``local`` = its ``source``/``tokenizer`` files)."""
    kind = entry.backend or "grounded"
    if kind != "grounded":
        from .backends import backend_module

        own = getattr(backend_module(kind), "download", None)
        if callable(own):
            return own(entry, progress=progress, force=force, **local)
    if local:
        raise CTLanguageError(f"--from/--tokenizer apply to published models (e.g. merlin), not {entry.id}")
    return download(entry, progress=progress, force=force)


def download(entry: ModelEntry, *, progress: ProgressFn | None = None, force: bool = False,
             timeout: float = 30.0, chunk: int = 1 << 16) -> Path:
    """Download, verify and unpack ``entry`` into the cache; returns the model folder.

    An interrupted download leaves ``<cache>/downloads/<id>-<version>.part`` and the next call
    resumes it with an HTTP Range request. The finished file must match ``entry.sha256``;
    otherwise it is deleted and CheckpointError is raised. Unpacking happens in a temporary
    folder that is renamed into place only after :func:`verify_model_dir` passed."""
    if entry.embedded and not entry.url or (entry.url or "").startswith("embedded:"):
        d = embedded_model_dir(entry)
        verify_model_dir(d, entry)
        return d
    if not entry.url and (entry.backend or "grounded") != "grounded":
        from .backends import backend_module   # a family whose weights the user fetches

        hint = backend_module(entry.backend).describe(entry).weights_hint or "Its weights are in place."
        raise CheckpointError(f"{entry.id} is not downloaded by CTLanguage. {hint}")
    if not entry.url or not entry.sha256:
        raise CheckpointError(f"catalog entry {entry.id} has no download url/sha256")
    target = cached_model_dir(entry)
    if (target / WEIGHTS).is_file() and not force:
        try:
            verify_model_dir(target, entry)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; run `ctlanguage models download {entry.id} --force` "
                                  "to replace the cached copy") from None
        return target
    dl = cache_dir() / "downloads"
    try:
        dl.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTLanguageError(f"cannot create the model cache {dl}: {exc.strerror}") from None
    suffix = ".tar.gz" if entry.url.endswith((".tar.gz", ".tgz")) else ".zip"
    final = dl / f"{entry.id}-{entry.version}{suffix}"
    part = final.with_name(final.name + ".part")
    if force:
        for f in (final, part):
            f.unlink(missing_ok=True)
    if not final.is_file():
        _fetch(entry.url, part, entry.size, progress, timeout, chunk)
        os.replace(part, final)
    actual = sha256_file(final)
    if actual != entry.sha256.lower():
        final.unlink(missing_ok=True)
        raise CheckpointError(
            f"the download of {entry.id} {entry.version} does not match the catalog's sha256 "
            f"(expected {entry.sha256[:12]}…, got {actual[:12]}…); it was deleted, try again")
    _unpack(final, target, entry)
    final.unlink(missing_ok=True)
    return target


def _fetch(url: str, part: Path, size: int | None, progress: ProgressFn | None,
           timeout: float, chunk: int) -> None:
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "ctlanguage"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - catalog URL
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have and size and have >= size:
            return  # already complete
        raise CTLanguageError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CTLanguageError(f"download of {url} failed: {reason}") from None
    with resp:
        status = getattr(resp, "status", 200)
        if have and status != 206:
            have = 0  # server ignored the Range request: start again
        mode = "ab" if have else "wb"
        length = resp.headers.get("Content-Length")
        total = (have + int(length)) if length is not None else size
        done = have
        if progress:
            progress(done, total, "resuming" if have else "downloading")
        try:
            with open(part, mode) as fh:
                while True:
                    block = resp.read(chunk)
                    if not block:
                        break
                    fh.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total, "downloading")
        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
            raise CTLanguageError(
                f"download of {url} was interrupted after {done} bytes ({exc}); run the same "
                "command again to resume") from None
    if total is not None and done < total:
        raise CTLanguageError(
            f"download of {url} was interrupted after {done} of {total} bytes; run the same "
            "command again to resume")


def _unpack(archive: Path, target: Path, entry: ModelEntry) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    dest = (tmp / name).resolve()
                    if not str(dest).startswith(str(tmp.resolve()) + os.sep) and dest != tmp.resolve():
                        raise CheckpointError(f"{archive.name} contains an unsafe path {name!r}")
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        root = tmp
        kids = [p for p in tmp.iterdir()]
        if not (tmp / WEIGHTS).exists() and len(kids) == 1 and kids[0].is_dir():
            root = kids[0]  # archive holds one top-level folder
        verify_model_dir(root, entry)
        if target.exists():
            shutil.rmtree(target)
        os.replace(root, target)
    except (zipfile.BadZipFile, tarfile.TarError) as exc:
        raise CheckpointError(f"{archive.name} is not a valid archive ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- maintainers

def update_embedded_entries(path: str | Path | None = None) -> list[str]:
    """Recompute sha256/size/weights_sha256 of embedded entries from the shipped folders
    (maintainer tool: ``python -m ctlanguage.catalog --update-embedded``)."""
    p = Path(path) if path else catalog_path()
    data = json.loads(p.read_text(encoding="utf-8"))
    changed = []
    for m in data["models"]:
        if not m.get("embedded"):
            continue
        e = ModelEntry.from_dict(m)
        w = embedded_model_dir(e) / WEIGHTS
        if not w.is_file():
            continue
        sha = sha256_file(w)
        if m.get("weights_sha256") != sha:
            changed.append(e.id)
        m["weights_sha256"] = m["sha256"] = sha
        m["size"] = w.stat().st_size
        try:
            cfg = json.loads((w.parent / CONFIG).read_text())
            if isinstance(cfg.get("metrics"), dict) and cfg["metrics"]:
                m["metrics"] = cfg["metrics"]
            if cfg.get("version"):
                m["version"] = str(cfg["version"])
        except (OSError, ValueError):
            pass
    p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return changed


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--update-embedded" in sys.argv:
        print("updated:", update_embedded_entries() or "nothing changed")

"""Model catalog and cache helpers for the module panel.

Pure functions (model choices, local checkpoints, clearing the cache) are testable without Qt;
:func:`build_manage_models_menu` builds the "Manage models…" menu inside Slicer (Qt imported
lazily). The catalog itself (Resources/catalog.json, cache folder, verified downloads) lives in
the engine: ``ctlanguage.catalog``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

LOCAL_MODELS_FILE = "local_models.json"


@dataclass
class ModelChoice:
    spec: str          # what Engine.load(model=...) takes: catalog id or a folder path
    label: str         # what the combo box shows
    available: bool    # usable offline now (embedded, downloaded or local folder)
    description: str = ""
    license: str = ""


def _catalog():
    from ctlanguage import catalog  # light: no torch

    return catalog


def local_models_file() -> Path:
    return _catalog().cache_dir() / LOCAL_MODELS_FILE


def local_models() -> list[str]:
    p = local_models_file()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(x) for x in data if isinstance(x, str)]


def add_local_checkpoint(folder: str | os.PathLike) -> str:
    """Verify a model folder (config.json + model.safetensors [+ SHA256SUMS]) and remember it.
    Returns the folder path to use as the model spec. Raises ValueError with the reason."""
    cat = _catalog()
    folder = Path(folder).expanduser().resolve()
    if folder.is_file():
        folder = folder.parent
    try:
        cat.verify_model_dir(folder)
    except Exception as exc:
        raise ValueError(f"'{folder}' is not a usable CTLanguage model folder: {exc}") from exc
    models = local_models()
    if str(folder) not in models:
        models.append(str(folder))
    p = local_models_file()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".part")
    tmp.write_text(json.dumps(models, indent=1), encoding="utf-8")
    os.replace(tmp, p)
    return str(folder)


def model_choices() -> list[ModelChoice]:
    """Catalog entries (embedded default first) followed by the local checkpoints."""
    cat = _catalog()
    out = []
    try:
        entries = cat.load_catalog()
    except Exception:
        entries = []
    for e in entries:
        try:
            cat.resolve_model(e.id, catalog=entries)
            available = True
        except Exception:
            available = False
        where = "embedded" if e.embedded else ("downloaded" if available else "not downloaded")
        out.append(ModelChoice(spec=e.id, label=f"{e.id} {e.version} ({where})", available=available,
                               description=e.description, license=e.license))
    for folder in local_models():
        out.append(ModelChoice(spec=folder, label=f"{Path(folder).name} (local: {folder})",
                               available=Path(folder).is_dir()))
    if not out:
        out.append(ModelChoice(spec="default", label="default", available=False))
    return out


def cache_folder() -> Path:
    return _catalog().cache_dir()


def clear_cache() -> int:
    """Delete downloaded models (not the embedded default, not the local checkpoint list).
    Returns the number of bytes freed."""
    models = cache_folder() / "models"
    if not models.is_dir():
        return 0
    freed = sum(f.stat().st_size for f in models.rglob("*") if f.is_file())
    shutil.rmtree(models)
    return freed


def download_model(model_id: str, progress=None) -> str:
    cat = _catalog()
    entry = cat.find_entry(model_id)
    if entry is None:
        raise ValueError(f"Unknown model '{model_id}'.")
    try:
        return str(cat.download(entry, progress=progress))
    except Exception as exc:
        raise ValueError(f"Download of {model_id} failed: {exc}. Behind a proxy, set HTTPS_PROXY; offline, "
                         "download the archive elsewhere and use 'Add local checkpoint…'.") from exc


# ------------------------------------------------------------------------------------------------
# Qt (inside Slicer only)
# ------------------------------------------------------------------------------------------------

def open_cache_folder() -> None:
    import qt

    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))


def build_manage_models_menu(parent, on_models_changed, current_model=lambda: "default"):
    """The "Manage models…" drop-down: download selected, add local checkpoint, open / clear cache."""
    import qt
    import slicer

    menu = qt.QMenu(parent)

    def _download():
        model_id = current_model()
        with slicer.util.tryWithErrorDisplay("Model download failed.", waitCursor=True):
            path = download_model(model_id, progress=lambda f, m="": slicer.app.processEvents())
            slicer.util.infoDisplay(f"Model {model_id} is ready in {path}.")
            on_models_changed(model_id)

    def _add_local():
        folder = qt.QFileDialog.getExistingDirectory(parent, "Model folder (config.json + model.safetensors)")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Not a usable model folder."):
            on_models_changed(add_local_checkpoint(folder))

    def _clear():
        if not slicer.util.confirmOkCancelDisplay(f"Delete all downloaded models in {cache_folder()}?\n"
                                                  "The embedded default model is kept."):
            return
        with slicer.util.tryWithErrorDisplay("Could not clear the model cache."):
            freed = clear_cache()
            slicer.util.infoDisplay(f"Freed {freed / 1e6:.1f} MB.")
            on_models_changed(None)

    menu.addAction("Download selected model").triggered.connect(_download)
    menu.addAction("Add local checkpoint…").triggered.connect(_add_local)
    menu.addSeparator()
    menu.addAction("Open cache folder").triggered.connect(open_cache_folder)
    menu.addAction("Clear cache…").triggered.connect(_clear)
    return menu

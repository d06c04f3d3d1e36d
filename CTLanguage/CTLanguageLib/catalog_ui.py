"""Model catalog and cache helpers for the module panel.

Pure functions (model choices with what each model can do, licence, size, CPU/GPU need and
whether it is on disk; the demo model's notice; local checkpoints; clearing the cache) are
testable without Qt; :class:`ModelSelector` is the panel's combo box, details label and "Manage
models…" menu inside Slicer (Qt imported lazily). The catalog itself (Resources/catalog.json,
cache folder, verified downloads) lives in the engine: ``ctlanguage.catalog``; what a model can
do comes from its backend's ``describe(entry)`` (``ctlanguage.backends``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ctlanguage.model_choices import DEVICE_TEXT, ModelChoice, entry_choice  # noqa: F401  (re-exported for the panel)

LOCAL_MODELS_FILE = "local_models.json"


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
    try:
        entries = _catalog().load_catalog()
    except Exception:
        entries = []
    out = [entry_choice(e, entries) for e in entries]
    for folder in local_models():
        on_disk = Path(folder).is_dir()
        out.append(ModelChoice(spec=folder, label=f"{Path(folder).name} (local: {folder})", available=on_disk,
                               where="local folder" if on_disk else "missing local folder"))
    return out or [ModelChoice(spec="default", label="default", available=False)]


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
    """Download, verify and unpack a catalog model, or the members of a pipeline that CTLanguage
    can fetch (``catalog.fetch``, as `ctlanguage models download`); ``progress(done_bytes,
    total_bytes, message)``. Returns the (last) model folder."""
    cat = _catalog()
    entry = cat.find_entry(model_id)
    if entry is None:
        raise ValueError(f"Unknown model '{model_id}'.")
    # a member already on disk returns at once from its fetch (verified, nothing downloaded)
    todo = [entry] if not entry.pipeline else [
        m for m in (cat.find_entry(i) for i in dict.fromkeys(entry.pipeline.values()))
        if m is not None and cat.fetchable(m)]
    path = ""
    for member in todo:
        try:
            path = str(cat.fetch(member, progress=progress))
        except Exception as exc:
            raise ValueError(f"Download of {member.id} failed: {exc}. Behind a proxy, set HTTPS_PROXY; offline, "
                             "download it elsewhere and use 'Add local checkpoint…' (or `ctlanguage models "
                             f"download {member.id} --from FILE`).") from exc
    return path


def download_question(choice: ModelChoice) -> str:
    """What the user is asked before a download starts (or a package is allowed to fetch its own)."""
    size = f"{choice.size / 1e6:.1f} MB" if choice.size else "an unknown amount of data"
    name = choice.label.split(" (")[0]
    lines = []
    if choice.downloadable:
        lines.append(f"Download {name} ({size}, licence {choice.license or 'unknown'}) into {cache_folder()}?")
    if choice.consent_download:
        lines.append(f"{', '.join(choice.missing)}: its package downloads its own weights the first time it "
                     f"runs. OK allows that download for this Slicer session (licence {choice.license or 'unknown'}).")
    return "\n".join(lines) + f"\n\n{choice.details()}"


def allow_package_downloads() -> None:
    """The user agreed: packages that fetch their own weights (TotalSegmentator) may do so."""
    _catalog().allow_downloads()


# ------------------------------------------------------------------------------------------------
# Qt (inside Slicer only)
# ------------------------------------------------------------------------------------------------

def open_cache_folder() -> None:
    import qt

    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))


class ModelSelector:
    """The panel's model combo box, the details label under it and the "Manage models…" menu.
    ``on_changed(spec)`` runs whenever the selection changes; the choice persists in QSettings."""

    SETTINGS_KEY = "CTLanguage/ModelSpec"

    def __init__(self, combo, details_label, manage_button, on_changed):
        import qt

        self.combo, self.details_label, self.on_changed = combo, details_label, on_changed
        self.choices: list[ModelChoice] = []
        self.fill(qt.QSettings().value(self.SETTINGS_KEY))
        combo.connect("currentIndexChanged(int)", self.changed)
        manage_button.setMenu(self.manage_menu(manage_button))

    def fill(self, select=None) -> None:
        import qt

        try:
            self.choices = model_choices()
        except ImportError as exc:  # engine package not installed yet: still show the panel
            self.choices = [ModelChoice(spec="default", label="default", available=False, hint=str(exc))]
        self.combo.blockSignals(True)
        self.combo.clear()
        for n, c in enumerate(self.choices):
            self.combo.addItem(c.label, c.spec)
            self.combo.setItemData(n, c.details(), qt.Qt.ToolTipRole)
        index = self.combo.findData(select) if select else -1
        self.combo.setCurrentIndex(index if index >= 0 else 0)
        self.combo.blockSignals(False)
        self.changed()

    def current(self) -> ModelChoice:
        spec = str(self.combo.currentData or "default")
        return next((c for c in self.choices if c.spec == spec), ModelChoice(spec=spec, label=spec, available=False))

    def spec(self) -> str:
        return self.current().spec

    def changed(self, index=None) -> None:
        import qt

        choice = self.current()
        qt.QSettings().setValue(self.SETTINGS_KEY, choice.spec)
        self.details_label.text = choice.details()
        self.on_changed(choice.spec)

    def download(self, parent) -> None:
        """Ask first (size, licence, folder), then download with a progress dialog (Cancel keeps
        the partial file; the next download resumes it)."""
        import qt
        import slicer

        choice = self.current()
        if choice.available or not (choice.downloadable or choice.consent_download):
            slicer.util.infoDisplay(f"{choice.label}: {'already on disk' if choice.available else choice.hint}.")
            return
        if not slicer.util.confirmOkCancelDisplay(download_question(choice)):
            return
        if choice.consent_download:
            allow_package_downloads()
            if not choice.downloadable:
                slicer.util.infoDisplay(f"{', '.join(choice.missing)} will download its weights when it first runs.")
                return
        dialog = qt.QProgressDialog(f"Downloading {choice.spec}…", "Cancel", 0, 1000, parent)
        dialog.setWindowModality(qt.Qt.WindowModal)
        dialog.show()

        def progress(done, total, message=""):
            from ctlanguage.errors import CancelledError

            dialog.setValue(int(1000 * done / total) if total else 0)
            dialog.setLabelText(f"{message}: {done / 1e6:.1f} of {(total or 0) / 1e6:.1f} MB")
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise CancelledError("download cancelled; it resumes from here next time")

        try:
            with slicer.util.tryWithErrorDisplay("Model download failed.", waitCursor=True):
                path = download_model(choice.spec, progress=progress)
                slicer.util.infoDisplay(f"Model {choice.spec} is ready in {path}.")
        finally:
            dialog.close()
            self.fill(choice.spec)

    def manage_menu(self, parent):
        """Download selected model, add a local checkpoint, open / clear the cache."""
        import qt
        import slicer

        menu = qt.QMenu(parent)

        def add_local():
            folder = qt.QFileDialog.getExistingDirectory(parent, "Model folder (config.json + model.safetensors)")
            if folder:
                with slicer.util.tryWithErrorDisplay("Not a usable model folder."):
                    self.fill(add_local_checkpoint(folder))

        def clear():
            if slicer.util.confirmOkCancelDisplay(f"Delete all downloaded models in {cache_folder()}?\n"
                                                  "The embedded default model is kept."):
                with slicer.util.tryWithErrorDisplay("Could not clear the model cache."):
                    slicer.util.infoDisplay(f"Freed {clear_cache() / 1e6:.1f} MB.")
                    self.fill(self.spec())

        menu.addAction("Download selected model…").triggered.connect(lambda: self.download(parent))
        menu.addAction("Add local checkpoint…").triggered.connect(add_local)
        menu.addSeparator()
        menu.addAction("Open cache folder").triggered.connect(open_cache_folder)
        menu.addAction("Clear cache…").triggered.connect(clear)
        return menu

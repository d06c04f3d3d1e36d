"""The Slicer model menu (CTLanguageLib/catalog_ui.py): each model with what it can do (from its
backend's ``describe``), licence, size, CPU/GPU need and whether it is on disk; the embedded
synthetic model's notice with its measured limits from the catalog (the same text the loaded
model carries); a download that asks first,
shows progress (the catalog's ``progress(done, total, message)``) and can be cancelled.

The ``ModelSelector`` runs with Qt and the Slicer dialogs stubbed (what only the application
provides); the catalog, backends' ``describe`` and the download (from a 127.0.0.1 server) are real.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CTLanguage"))

from CTLanguageLib import catalog_ui  # noqa: E402
from ctlanguage import catalog  # noqa: E402
from test_catalog import _model_zip, server  # noqa: E402,F401  (127.0.0.1 model server fixture)


def test_shipped_models_say_what_they_can_do_and_the_demo_models_limits():
    entry = catalog.default_entry()
    first = catalog_ui.model_choices()[0]
    assert first.spec == entry.id and first.available and first.where == "embedded"
    text = first.details()
    for needle in ("anatomy (25)", "finding masks", "scores (calibrated)", f"Licence: {entry.license}",
                   f"{entry.size / 1e6:.1f} MB", "runs on: CPU", "On disk: embedded"):
        assert needle in text, (needle, text)
    from ctlanguage.backends import grounded

    m = entry.metrics
    assert first.notice == grounded.demo_model_notice(entry)  # what the loaded model's info says
    assert "trained only on synthetic anatomy" in first.notice
    for key, label in (("mean_organ_dice", "organ Dice"), ("mean_finding_auc", "finding AUC"),
                       ("mean_finding_dice", "finding Dice")):
        assert f"{label} {m[key]}" in first.notice  # the catalog's measured numbers
    assert first.notice in text and first.notice not in first.details(notice=False)


@pytest.fixture
def remote_catalog(tmp_path, monkeypatch, server):  # noqa: F811
    """A catalog with a downloadable grounded model (served on 127.0.0.1), a pipeline built on
    it, and a model of a backend family that is not installed."""
    url, handler = server
    data, weights = _model_zip(tmp_path)
    handler.files["/remote.zip"] = data
    import hashlib

    models = [
        {"id": "remote-model", "version": "2.0", "url": f"{url}/remote.zip", "sha256": hashlib.sha256(data).hexdigest(),
         "size": len(data), "weights_sha256": weights, "license": "CC-BY-4.0", "description": "remote"},
        {"id": "remote-pipeline", "version": "1.0", "license": "CC-BY-4.0", "description": "composed",
         "pipeline": {"anatomy": "remote-model", "masks": "remote-model", "scores": "remote-model"}},
        {"id": "other-family", "version": "1.0", "backend": "no-such-family", "license": "MIT", "size": 2_000_000_000},
        {"id": "anatomy-package", "version": "2.18.0", "backend": "totalsegmentator", "license": "Apache-2.0"},
    ]
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "no-totalseg-weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts-home"))
    monkeypatch.delenv("CTLANGUAGE_ALLOW_DOWNLOADS", raising=False)
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"format": "ctlanguage-catalog/1", "models": models}))
    monkeypatch.setenv("CTLANGUAGE_CATALOG", str(path))
    monkeypatch.setenv("CTLANGUAGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_models_not_on_disk_say_how_to_get_them(remote_catalog):
    by_id = {c.spec: c for c in catalog_ui.model_choices()}
    remote = by_id["remote-model"]
    assert not remote.available and remote.downloadable and remote.where == "not on disk"
    assert "ctlanguage models download remote-model" in remote.hint and "not on disk" in remote.details()
    assert remote.notice == ""  # not a synthetic-anatomy model
    pipeline = by_id["remote-pipeline"]
    assert not pipeline.available and pipeline.downloadable and pipeline.missing == ("remote-model",)
    assert not pipeline.consent_download
    assert "scores (calibrated)" in pipeline.details() and "ctlanguage models download remote-model" in pipeline.hint
    other = by_id["other-family"]
    assert not other.available and other.can_do == () and "no-such-family" in other.hint
    assert "2000.0 MB" in other.details() and "Can do: unknown" in other.details()


class Combo:
    """The few QComboBox calls ModelSelector makes."""

    def __init__(self):
        self.items, self.index, self.tooltips = [], -1, {}

    def blockSignals(self, flag):  # noqa: N802
        pass

    def clear(self):
        self.items, self.index = [], -1

    def addItem(self, label, data):  # noqa: N802
        self.items.append((label, data))

    def setItemData(self, n, text, role):  # noqa: N802
        self.tooltips[n] = text

    def findData(self, data):  # noqa: N802
        return next((n for n, (_l, d) in enumerate(self.items) if d == data), -1)

    def setCurrentIndex(self, n):  # noqa: N802
        self.index = n

    @property
    def currentData(self):  # noqa: N802
        return self.items[self.index][1] if self.index >= 0 else None

    def connect(self, signal, slot):
        pass


@pytest.fixture
def selector(monkeypatch, remote_catalog):
    """A ModelSelector on stubbed Qt widgets and Slicer dialogs; records what the user was asked."""
    import slicer

    qt = mock.MagicMock()
    qt.QSettings.return_value.value.return_value = "remote-model"
    dialog = qt.QProgressDialog.return_value
    dialog.wasCanceled = False
    monkeypatch.setitem(sys.modules, "qt", qt)
    asked, infos, errors, answer = [], [], [], {"ok": True}

    @contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:  # the real one shows a dialog and re-raises
            errors.append(str(exc))
            raise

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or answer["ok"],
                        raising=False)
    monkeypatch.setattr(slicer.util, "infoDisplay", lambda text, *a, **k: infos.append(text), raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display, raising=False)
    monkeypatch.setattr(slicer, "app", SimpleNamespace(processEvents=lambda: None), raising=False)
    changed, label = [], SimpleNamespace(text="")
    sel = catalog_ui.ModelSelector(Combo(), label, mock.MagicMock(), changed.append)
    return SimpleNamespace(sel=sel, dialog=dialog, asked=asked, infos=infos, errors=errors, answer=answer,
                           changed=changed, label=label, cache=remote_catalog)


def test_selector_lists_models_and_reports_the_selection(selector):
    s = selector
    assert [d for _l, d in s.sel.combo.items] == ["remote-model", "remote-pipeline", "other-family", "anatomy-package"]
    assert s.sel.spec() == "remote-model" and s.changed == ["remote-model"]  # the saved choice
    assert s.label.text == s.sel.current().details() and "not on disk" in s.label.text
    assert s.sel.combo.tooltips[0] == s.sel.choices[0].details()


def test_download_asks_first_and_nothing_happens_on_no(selector):
    s = selector
    s.answer["ok"] = False
    s.sel.download(None)
    assert len(s.asked) == 1 and "CC-BY-4.0" in s.asked[0] and "MB" in s.asked[0] and str(s.cache) in s.asked[0]
    assert not (s.cache / "models").exists() and not s.dialog.setValue.called


def test_download_shows_progress_and_makes_the_model_available(selector):
    s = selector
    s.sel.download(None)
    assert s.asked and not s.errors, s.errors
    values = [c.args[0] for c in s.dialog.setValue.call_args_list]
    assert values and values[-1] == 1000 and values == sorted(values)
    assert any("MB" in c.args[0] for c in s.dialog.setLabelText.call_args_list)
    assert s.sel.current().available and s.sel.current().where == "downloaded"
    assert "ready" in s.infos[-1]
    s.sel.download(None)  # already there: says so, asks nothing
    assert len(s.asked) == 1 and "already on disk" in s.infos[-1]


def test_cancelled_download_keeps_the_partial_file_and_no_model(selector):
    s = selector

    def cancel_after_first_bytes(value):  # the user presses Cancel once data arrived
        s.dialog.wasCanceled = value > 0

    s.dialog.setValue.side_effect = cancel_after_first_bytes
    with pytest.raises(ValueError, match="cancelled"):
        s.sel.download(None)
    assert s.errors and not (s.cache / "models").exists()
    assert list((s.cache / "downloads").glob("*.part"))  # the next download resumes it
    assert not s.sel.current().available


def test_models_that_cannot_be_downloaded_here_say_why(selector):
    s = selector
    s.sel.combo.setCurrentIndex(2)
    s.sel.download(None)
    assert not s.asked and "no-such-family" in s.infos[-1]


def test_downloading_a_pipeline_fetches_its_missing_member(selector):
    s = selector
    s.sel.combo.setCurrentIndex(1)
    s.sel.download(None)
    assert len(s.asked) == 1 and not s.errors, s.errors
    values = [c.args[0] for c in s.dialog.setValue.call_args_list]
    assert values and values[-1] == 1000
    assert {c.spec: c for c in catalog_ui.model_choices()}["remote-model"].where == "downloaded"


@pytest.mark.parametrize("agree", [False, True])
def test_a_package_that_fetches_its_own_weights_asks_for_consent_first(selector, agree):
    """TotalSegmentator downloads its weights itself on first use: the panel asks, and only a yes
    sets the consent its backend reads (for this Slicer session); nothing else is downloaded."""
    import os

    pytest.importorskip("totalsegmentator")
    s = selector
    s.sel.combo.setCurrentIndex(3)
    choice = s.sel.current()
    assert choice.consent_download and not choice.downloadable and choice.missing == ("anatomy-package",)
    s.answer["ok"] = agree
    s.sel.download(None)
    assert len(s.asked) == 1 and "downloads its own weights" in s.asked[0] and "Apache-2.0" in s.asked[0]
    assert (os.environ.get("CTLANGUAGE_ALLOW_DOWNLOADS") == "1") == agree
    assert not s.dialog.setValue.called and not (s.cache / "models").exists()
    if agree:
        assert "will download its weights when it first runs" in s.infos[-1]
    os.environ.pop("CTLANGUAGE_ALLOW_DOWNLOADS", None)

"""Browser end-to-end test of the web demo, as a person would use it.

Starts `ctlanguage web` on a free port bound to 0.0.0.0 (so it requires an access token), drives
Debian's Chromium (headless, through Playwright with an explicit executable path; no browser is
downloaded), and checks:

* without the token the start page answers 401; with ``?token=`` it hands out a session, and the
  session page itself answers 401 to a browser that lacks the token's cookie;
* the start page hands out a session whose model menu says what the model can do (and the demo
  model's measured limits); the bundled synthetic case loads; Encode shows progress;
* a prompt for a finding the case contains shows its probability in the results table, and
  after clicking its row the *server-rendered axial view* (the PNG the page shows) has pixels in
  the segment's colour lying on the engine's own mask for that prompt (computed in-process on
  the same volume; mapped through the slice view's XY->RAS matrix and the CT's IJK->RAS), and
  on the phantom's ground-truth mask of that finding (a loose floor for the weak model);
* a prompt for a finding the case does not contain gives a probability < 0.5;
* the CSV export downloads and lists both prompts;
* a second tab is another session (another process, nothing loaded); a corrupt upload and an
  over-size upload give readable messages in the page, and that session still works;
* stopping the server leaves no process and no temporary file behind.

With CTLANGUAGE_WEB_TEST_MODEL pointing at an untrained model, set
CTLANGUAGE_WEB_TEST_PLUMBING_ONLY=1 to skip the checks that need a trained model.

Screenshots go to $CTLANGUAGE_WEB_SCREENSHOTS (docs/images when it is "docs"), else tmp_path.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

import numpy as np
import pytest

from web_helpers import (CHROMIUM, CHROMIUM_ARGS, WebServer, hex_rgb, offscreen_gl_available,
                         overlay_pixels, pixels_to_ras, ras_in_mask, wait_stable_image)

ROOT = Path(__file__).resolve().parents[1]
CASE_ID, CASE_SEED = "synthetic-a", 1            # ctlanguage_web.session.BUNDLED_CASES[0]
PRESENT = ("cardiomegaly", None, "enlarged heart")  # (phantom finding key, side, prompt)
ABSENT_PROMPT = "kidney stone"                    # not in the seed-1 phantom
# the issue asks for the present finding's probability to *show*; with a model that ranks it
# reliably above 0.5 on this case, set True to assert that too
PRESENT_MUST_BE_LIKELY = True   # v2 scores "enlarged heart" 0.97 on this case (v1: 0.13)

PLUMBING_ONLY = os.environ.get("CTLANGUAGE_WEB_TEST_PLUMBING_ONLY") == "1"
pytestmark = [pytest.mark.web, pytest.mark.slow]


def _requirements():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (scripts/install_system_deps.sh installs Debian's chromium)")
    if not offscreen_gl_available():
        pytest.skip("no offscreen OpenGL (libEGL or libOSMesa); run scripts/install_system_deps.sh")
    pytest.importorskip("playwright.sync_api", reason="pip playwright is not installed")
    pytest.importorskip("trame_slicer", reason="trame-slicer is not installed")
    model = os.environ.get("CTLANGUAGE_WEB_TEST_MODEL", "default")
    try:
        from ctlanguage.engine import resolve_model_dir

        resolve_model_dir(model)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"model {model!r} is not installed: {exc}")
    return model


def _shots_dir(tmp_path: Path) -> Path:
    target = os.environ.get("CTLANGUAGE_WEB_SCREENSHOTS", "")
    if target == "docs":
        return ROOT / "docs" / "images"
    return Path(target) if target else tmp_path / "shots"


def _float(text: str) -> float:
    m = re.search(r"[-+]?\d*\.?\d+", text)
    assert m, f"no number in {text!r}"
    return float(m.group())


def _row(page, prompt: str):
    rows = page.locator("tr.result-row").filter(has=page.locator("td.col-prompt", has_text=prompt))
    rows.first.wait_for(timeout=60_000)
    return rows.first


def _run_prompt(page, prompt: str):
    page.fill("#prompt-input", prompt)
    page.click("#run-btn")
    return _row(page, prompt)


def test_web_demo_end_to_end(tmp_path):
    model = _requirements()
    from playwright.sync_api import sync_playwright

    t_start = time.monotonic()
    shots = _shots_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    server_tmp = tmp_path / "server_tmp"
    server = WebServer(server_tmp, model, extra_args=["--max-upload-mb", "2", "--idle-timeout", "30"],
                       host="0.0.0.0", token=secrets.token_urlsafe(12))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                _drive(browser, server, shots, tmp_path)
            finally:
                browser.close()
    finally:
        server.stop()
    # nothing left behind: no session process, no temporary folder
    leftovers = [p.name for p in server_tmp.iterdir()] if server_tmp.exists() else []
    assert leftovers == [], f"temporary files left behind: {leftovers}\n{server.log()[-2000:]}"
    assert time.monotonic() - t_start < 180, "the end-to-end test must stay under 3 minutes"


def _drive(browser, server, shots: Path, tmp_path: Path):
    from ctlanguage.phantom import generate_case

    context = browser.new_context(viewport={"width": 1480, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # --- tab 1: the token, then start page -> own session -----------------------------------------
    assert page.goto(server.url).status == 401  # bound beyond loopback: no token, no page
    page.goto(server.url + "?token=" + server.token)
    page.wait_for_selector("#load-case", timeout=120_000)
    session_url = page.url
    assert not session_url.startswith(server.url), "the start page should hand out a session URL"
    assert "token" not in session_url
    stranger = browser.new_context()  # no cookie: the session process refuses it too
    assert stranger.new_page().goto(session_url).status == 401
    stranger.close()
    # the model menu says what the model can do and, for the demo model, its measured limits
    details = page.inner_text("#model-details")
    assert "Can do:" in details and "Licence:" in details and "On disk:" in details, details
    if os.environ.get("CTLANGUAGE_WEB_TEST_MODEL", "default") == "default":
        assert "trained only on synthetic anatomy" in page.inner_text("#model-notice")
    page.screenshot(path=str(shots / "web_model_menu.png"))

    # --- load the bundled synthetic case ----------------------------------------------------------
    page.click("#load-case")
    page.wait_for_selector("#volume-info", timeout=60_000)
    assert f"seed {CASE_SEED}" in page.inner_text("#volume-info")
    axial0 = wait_stable_image(page, "axial", settle=0.5)
    assert axial0.std() > 10, "the axial view shows no CT"

    # --- encode, with progress -------------------------------------------------------------------
    page.click("#encode-btn")
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        value = page.get_attribute("#encode-progress", "aria-valuenow")
        if value is not None:
            seen.add(float(value))
        if page.inner_text("#encode-message").startswith("Encoded"):
            break
        assert not page.locator("#encode-error").count(), page.inner_text("#encode-error")
        time.sleep(0.2)
    assert page.inner_text("#encode-message").startswith("Encoded"), "encoding did not finish"
    assert any(0 < v < 100 for v in seen), f"no intermediate progress was shown: {sorted(seen)}"

    # --- a finding the case contains ---------------------------------------------------------------
    key, side, prompt = PRESENT
    row = _run_prompt(page, prompt)
    p_present = _float(row.locator("td.col-probability").inner_text())
    assert 0.0 <= p_present <= 1.0, f"{prompt!r}: probability {p_present} is not a probability"
    assert PLUMBING_ONLY or not PRESENT_MUST_BE_LIKELY or p_present >= 0.5, \
        f"{prompt!r}: probability {p_present} for a finding the case contains"
    color = hex_rgb(page.evaluate(
        "(p) => { const r = trame.state.get('results').find(r => r.prompt === p); return r.color; }", prompt))

    row.click()  # jump to the finding
    page.wait_for_timeout(300)
    axial = wait_stable_image(page, "axial")
    geo = page.evaluate("() => trame.trigger('ctl_view_geometry', ['axial'])")
    assert axial.shape[:2] == (geo["height"], geo["width"]), (axial.shape, geo)

    case = generate_case(CASE_SEED)
    truth = np.zeros(np.shape(case.volume), dtype=np.uint8)
    for f in case.findings:
        if f.name == key and (side is None or f.laterality == side):
            truth |= np.asarray(f.mask, dtype=np.uint8)
    assert truth.any(), f"the phantom seed {CASE_SEED} has no {key}: update the test's constants"

    if PLUMBING_ONLY:
        return _rest(page, context, server, shots, tmp_path, session_url, errors, prompt)
    tinted = overlay_pixels(axial, color)
    rows_, cols_ = np.nonzero(tinted)
    assert len(rows_) >= 30, f"only {len(rows_)} overlay-coloured pixels in the axial view"
    ras = pixels_to_ras(rows_, cols_, geo["height"], geo["xy_to_ras"])
    H, W = geo["height"], geo["width"]
    rr, cc = np.mgrid[0:H:2, 0:W:2]
    grid_ras = pixels_to_ras(rr.ravel(), cc.ravel(), H, geo["xy_to_ras"])
    # Rendering fidelity, independent of model quality: the page draws exactly the engine's mask
    # (same model, same volume, computed here in-process) on the right voxels.
    engine_mask = _engine_mask(case, prompt)
    on_engine = ras_in_mask(ras, engine_mask, case.ijk_to_ras, dilate=1)
    assert on_engine.mean() >= 0.9, f"only {on_engine.mean():.0%} of the overlay lies on the engine's mask"
    engine_px = ras_in_mask(grid_ras, engine_mask, case.ijk_to_ras, dilate=0)
    assert engine_px.sum() > 0, "the axial slice after the jump does not cross the engine's mask"
    shown = tinted[rr.ravel()[engine_px], cc.ravel()[engine_px]].mean()
    assert shown >= 0.6, f"only {shown:.0%} of the engine's mask on this slice is overlaid"
    # Where the finding is: the overlay sits on the true finding (loose floor: the embedded model
    # is weak, see docs/evaluation.md; how much of the true finding is covered is a model-quality
    # question measured by `ctlanguage evaluate`, not by this test).
    inside = ras_in_mask(ras, truth, case.ijk_to_ras, dilate=2)
    assert inside.mean() >= 0.3, f"only {inside.mean():.0%} of the overlay lies on the true {key}"
    # the finding's surface is drawn in the 3D view and the overlay in the other slice views
    for name in ("3d", "coronal", "sagittal"):
        n = int(overlay_pixels(wait_stable_image(page, name, settle=0.5), color).sum())
        assert n >= 30, f"only {n} overlay-coloured pixels in the {name} view"
    page.screenshot(path=str(shots / "web_present_finding.png"))
    _save_png(shots / "web_axial_view.png", axial)
    _rest(page, context, server, shots, tmp_path, session_url, errors, prompt)


def _engine_mask(case, prompt):
    """The mask the engine gives for `prompt` on the bundled case, on the case's own grid."""
    from ctlanguage.engine import Engine
    from ctlanguage.volume import CTVolume

    engine = Engine.load(os.environ.get("CTLANGUAGE_WEB_TEST_MODEL", "default"), device="cpu")
    volume = CTVolume(array=np.asarray(case.volume, dtype=np.float32),
                      ijk_to_ras=np.asarray(case.ijk_to_ras, dtype=np.float64), modality="CT")
    return engine.query(engine.encode(volume), prompt)[0].mask


def _rest(page, context, server, shots, tmp_path, session_url, errors, prompt):

    # --- a finding the case does not contain ----------------------------------------------------
    row2 = _run_prompt(page, ABSENT_PROMPT)
    p_absent = _float(row2.locator("td.col-probability").inner_text())
    assert PLUMBING_ONLY or p_absent < 0.5, f"{ABSENT_PROMPT!r}: probability {p_absent} for an absent finding"
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "web_overview.png"))

    # --- downloads ----------------------------------------------------------------------------------
    with page.expect_download(timeout=60_000) as dl:
        page.click("#downloads a[data-kind='csv']")
    csv_path = tmp_path / "findings.csv"
    dl.value.save_as(str(csv_path))
    csv_text = csv_path.read_text()
    assert prompt in csv_text and ABSENT_PROMPT in csv_text
    assert page.url == session_url, page.url
    assert page.locator("#export-warning").count() == 0   # a clean export warns of nothing
    with page.expect_download(timeout=60_000) as dl:
        page.click("#downloads a[data-kind='seg_nrrd']")
    assert dl.value.suggested_filename.endswith(".seg.nrrd")

    # --- tab 2: an independent session; bad uploads give messages, not crashes ----------------------
    page2 = context.new_page()
    page2.goto(server.url)
    page2.wait_for_selector("#load-case", timeout=120_000)
    assert page2.url != session_url, "two tabs got the same session"
    assert page2.locator("#volume-info").count() == 0 and page2.locator("tr.result-row").count() == 0
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file" * 100)
    page2.set_input_files("#upload-input", str(bad))
    msg = page2.locator("#load-message")
    msg.wait_for(timeout=60_000)
    page2.wait_for_function(
        "() => { const e = document.querySelector('#load-message'); return e && !/Uploading/.test(e.innerText); }",
        timeout=60_000)
    text = msg.inner_text()
    assert "broken.nii.gz" in text and "Loaded" not in text, text
    page2.wait_for_function("() => !trame.state.get('loading')", timeout=30_000)
    page2.screenshot(path=str(shots / "web_bad_upload.png"))
    big = tmp_path / "big.nrrd"
    big.write_bytes(b"\0" * 2_500_000)
    page2.set_input_files("#upload-input", str(big))
    page2.wait_for_function(
        "() => { const e = document.querySelector('#load-message'); return e && /at most/.test(e.innerText); }",
        timeout=30_000)
    page2.click("#load-case")  # the session still works after the bad uploads
    page2.wait_for_selector("#volume-info", timeout=60_000)
    # the first tab is untouched by the second
    assert page.locator("tr.result-row").count() == 2
    assert not errors, f"JavaScript errors in the page: {errors}"
    page2.close()
    page.close()
    context.close()


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


# ---- the session logic without a browser (fast) ---------------------------------------------------

def _web_session(tmp_path, max_upload_mb=50):
    pytest.importorskip("trame_slicer")
    from trame_slicer.core import SlicerApp

    from ctlanguage_web.session import WebSession

    import _fake_engine

    engine = _fake_engine.fake_engine()  # the real Engine on the fake backend
    return WebSession(SlicerApp(), tmp_path / "work", engine_loader=lambda m, d: engine,
                      max_upload_mb=max_upload_mb)


def _small_volume():
    from ctlanguage.volume import CTVolume

    arr = np.full((8, 12, 10), -1000, np.float32)
    arr[1:7, 2:10, 2:8] = 40
    aff = np.diag([1.5, 1.5, 2.5, 1.0])
    aff[:3, 3] = (-10, 20, 30)
    return CTVolume(array=arr, ijk_to_ras=aff, source="test", modality="CT")


def test_web_session_lists_models_and_switches_only_to_models_on_disk(tmp_path):
    from ctlanguage import catalog

    s = _web_session(tmp_path)
    entry = catalog.default_entry()
    models = s.model_choices()
    assert s.logic.model_id == entry.id and models[0]["value"] == entry.id
    first = models[0]
    assert "Can do:" in first["details"] and entry.license in first["details"] and "On disk: embedded" in first["details"]
    assert "trained only on synthetic anatomy" in first["notice"] and not first["props"]["disabled"]
    s.load_bundled(s.bundled_cases()[0]["value"])
    s.encode()
    assert s.is_encoded()
    with pytest.raises(ValueError, match="Unknown model"):
        s.set_model("no-such-model")
    s.set_model(entry.id)  # the same model: the encoding stays
    assert s.is_encoded()
    s.cleanup()


def test_web_session_uploads_exports_and_cleanup(tmp_path):
    import zipfile

    from ctlanguage.dicom_write import write_dicom_series
    from ctlanguage.io import write_volume

    s = _web_session(tmp_path, max_upload_mb=1)
    vol = _small_volume()
    # NIfTI upload -> encode -> prompts -> exports (no DICOM SEG for a NIfTI input)
    write_volume(vol, tmp_path / "ct.nii.gz")
    s.load_upload([("ct.nii.gz", (tmp_path / "ct.nii.gz").read_bytes())])
    assert s.input.kind == "nifti" and np.allclose(s.input.volume.ijk_to_ras, vol.ijk_to_ras)
    with pytest.raises(ValueError, match="Encode"):
        s.run_prompts("liver lesion")
    s.encode()
    rows = s.run_prompts("liver lesion; liver cyst")
    assert [r["prompt"] for r in rows] == ["liver lesion", "liver cyst"]
    finding = s.logic.results(s.volume_node)[0].finding
    assert rows[0]["probability_text"] == f"{finding.probability:.2f} (uncalibrated)"  # the fake is uncalibrated
    assert rows[0]["color"] == "#%02x%02x%02x" % tuple(finding.color) and rows[0]["models"] == "fake-model"
    assert rows[0]["score_label"] == finding.score_label
    assert [k["kind"] for k in s.export_kinds()] == ["seg_nrrd", "masks", "csv", "json", "html", "all"]
    path, name, _mime = s.export_file("csv")
    assert "liver cyst" in path.read_text() and name.endswith(".csv")
    with zipfile.ZipFile(s.export_file("all")[0]) as zf:
        assert {"findings.json", "segmentation.seg.nrrd", "report.html"} <= set(zf.namelist())
    with pytest.raises(ValueError, match="DICOM"):
        s.export_file("dicom_seg")
    # zipped DICOM folder -> DICOM SEG available
    write_dicom_series(vol, tmp_path / "dcm")
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as zf:
        for p in sorted((tmp_path / "dcm").rglob("*")):
            if p.is_file():
                zf.write(p, "study/" + p.relative_to(tmp_path / "dcm").as_posix())
    s.load_upload([("series.zip", (tmp_path / "series.zip").read_bytes())])
    assert s.input.kind == "dicom" and s.rows() == []
    s.encode()
    s.run_prompts("liver lesion")
    assert s.export_file("dicom_seg")[0].stat().st_size > 0
    assert s.export_warnings == []
    # the source files gone by export time: no SEG, and the download says why (the warning the
    # engine's export returned); the other exports are still there
    for f in s.input.volume.metadata["files"]:
        Path(f).unlink()
    s.run_prompts("liver cyst")
    with pytest.raises(ValueError, match="segmentation.dcm not written: .*can no longer be read"):
        s.export_file("dicom_seg")
    assert len(s.export_warnings) == 1 and "can no longer be read" in s.export_warnings[0]
    assert "liver cyst" in s.export_file("csv")[0].read_text()
    # bad uploads: readable messages, no server path in them
    for files, pattern in [
        ([("broken.nii.gz", b"not a nifti" * 10)], "broken.nii.gz"),
        ([("notes.txt", b"hello")], "Unsupported upload"),
        ([("x.zip", b"PK not really")], "not a valid zip"),
        ([("big.nrrd", b"\0" * 1_200_000)], "at most 1 MB"),
    ]:
        with pytest.raises(ValueError, match=pattern) as exc:
            s.load_upload(files)
        assert str(tmp_path) not in str(exc.value)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.dcm", b"x")
    with pytest.raises(ValueError, match="unsafe path"):
        s.load_upload([("evil.zip", evil.read_bytes())])
    assert not (tmp_path / "escape.dcm").exists()
    s.cleanup()
    assert not (tmp_path / "work").exists()

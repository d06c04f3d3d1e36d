"""MRML glue on a REAL vtkMRMLScene (slicer-core wheel), without the Slicer application.

The input volume node is deliberately awkward: axes permuted and flipped (not RAS-aligned),
anisotropic spacing (0.8 x 1.1 x 2.5 mm), origin far from zero. Everything the module shows comes
back through MRML and is compared with what the engine produced on the source grid.

The engine is always the real ``ctlanguage.engine.Engine``; two backends drive the same assertions:
* the fake backend of ``Testing/_fake_engine.py`` (blob masks, fixed scores; fast) -- always runs;
* the embedded default model -- runs when its weights are installed (skipped with the reason
  otherwise).
The widget's single front (``CTLanguageLib.logic.Logic``) and the module file are driven too.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CTLanguage"))

import _fake_engine  # noqa: E402
from CTLanguageLib import background, exports, mrml_glue, results_table, signals, worker_process  # noqa: E402
from CTLanguageLib.logic import Logic  # noqa: E402
from CTLanguageLib.session import CTLanguageSession  # noqa: E402

# Non-RAS orientation: i runs posterior->anterior? no: i -> -A (posterior), j -> -S (inferior)
# along the second axis, k -> +R; anisotropic spacing; offset origin.
IJK_TO_RAS = np.array([
    [0.0, 0.0, 2.5, -61.0],
    [-0.8, 0.0, 0.0, 37.5],
    [0.0, -1.1, 0.0, 212.25],
    [0.0, 0.0, 0.0, 1.0],
])
SHAPE = (18, 40, 33)  # [k, j, i]


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

def make_scene():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    scene._ctl_logics = [logic]  # keep alive with the scene's Python wrapper
    return scene


def synthetic_ct(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    body = ((j - 20) / 17.0) ** 2 + ((i - 16) / 14.0) ** 2 < 1.0
    ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, SHAPE)
    ct[((j - 15) / 5.0) ** 2 + ((i - 10) / 4.0) ** 2 + ((k - 9) / 6.0) ** 2 < 1.0] = -850.0
    return ct.astype(np.int16)


@pytest.fixture()
def scene():
    return make_scene()


@pytest.fixture()
def volume_node(scene):
    node = mrml_glue.ctvolume_to_volume_node(scene, SimpleNamespace(array=synthetic_ct(), ijk_to_ras=IJK_TO_RAS), "CT awkward")
    return node


def encode_count() -> int:
    return _fake_engine.FakeBackend.calls.count("encode")


def make_finding(prompt, mask, color=(200, 120, 40), probability=None, anatomy="body"):
    """A real ``ctlanguage.engine.Finding`` around a given mask (no terminology: the generic one)."""
    from ctlanguage.engine import Finding

    return Finding(prompt=prompt, parsed=None, kind="anatomy", anatomy=anatomy, finding=None, laterality=None,
                   probability=probability, prompt_confidence=1.0, mask=mask, volume_ml=0.0, codes=None,
                   color=color)


def terminology_logic():
    return slicer.vtkSlicerTerminologiesModuleLogic()


def assert_terminology_parses(s: str):
    entry = slicer.vtkSlicerTerminologyEntry()
    assert terminology_logic().DeserializeTerminologyEntry(s, entry), s
    assert entry.GetCategoryObject().GetCodeValue(), s
    assert entry.GetTypeObject().GetCodeValue(), s
    assert entry.GetCategoryObject().GetCodingSchemeDesignator() in ("SCT", "DCM", "SRT"), s
    return entry


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------

def test_volume_node_to_ctvolume_keeps_voxels_and_exact_affine(scene, volume_node):
    vol = mrml_glue.volume_node_to_ctvolume(volume_node)
    assert vol.array.dtype == np.float32 and vol.array.shape == SHAPE
    np.testing.assert_array_equal(vol.array, synthetic_ct().astype(np.float32))
    np.testing.assert_array_equal(vol.ijk_to_ras, IJK_TO_RAS)
    # RAS of a voxel from MRML equals the engine's
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    np.testing.assert_allclose(m.MultiplyPoint((3, 7, 11, 1))[:3], vol.ijk_to_ras_points([[3, 7, 11]])[0])


def test_linear_parent_transform_is_composed_and_segmentation_follows(scene, volume_node):
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -7.0, 11.0)
    t.SetMatrixTransformToParent(mrml_glue.numpy_to_vtk_matrix(shift))
    volume_node.SetAndObserveTransformNodeID(t.GetID())
    vol = mrml_glue.volume_node_to_ctvolume(volume_node)
    np.testing.assert_allclose(vol.ijk_to_ras, shift @ IJK_TO_RAS)
    seg = mrml_glue.new_segmentation_node(scene, volume_node)
    assert seg.GetTransformNodeID() == t.GetID()


def test_rejects_non_volumes(scene):
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError):
        mrml_glue.volume_node_to_ctvolume(label)
    with pytest.raises(ValueError):
        mrml_glue.volume_node_to_ctvolume(None)


# ----------------------------------------------------------------------------------------------
# prompt -> segments / table / seg.nrrd, with the fake engine
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def fake_engine():
    _fake_engine.FakeBackend.calls = []
    return _fake_engine.fake_engine()


@pytest.fixture()
def fake_session(scene, fake_engine):
    return CTLanguageSession(scene, engine_loader=lambda model, device: fake_engine)


def check_segments_match(session, scene, volume_node):
    seg = session.segmentation_node(volume_node)
    assert seg is not None
    ref = seg.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert ref, "segmentation has no reference geometry"
    for r in session.results(volume_node):
        segment = seg.GetSegmentation().GetSegment(r.segment_id)
        assert segment.GetName() == r.prompt
        back = mrml_glue.segment_mask_on_reference(scene, seg, r.segment_id, volume_node)
        assert back.shape == r.finding.mask.shape
        assert np.array_equal(back, (r.finding.mask > 0).astype(np.uint8)), r.prompt
        assert_terminology_parses(segment.GetTerminology())


def test_prompts_to_segments_exact_on_source_grid(fake_session, scene, volume_node):
    fake_session.encode_inline(volume_node)
    results = fake_session.run_prompts(volume_node, "liver lesion; fluid around the left lung ; liver")
    assert [r.prompt for r in results] == ["liver lesion", "fluid around the left lung", "liver"]
    assert all(r.answer.mask.sum() > 0 for r in results)
    check_segments_match(fake_session, scene, volume_node)
    # the effusion is judged absent by the stand-in's zero-shot rule (0.21 < 0.5): drawn, listed
    # and exported with an empty mask; the answer keeps its mask for "draw absent findings"
    assert [r.finding.mask_suppressed for r in results] == [False, True, False]
    assert results[1].finding.mask.sum() == 0 and results[1].finding.volume_ml == 0
    fake_session.set_absent_masks(volume_node, True)
    assert [r.finding.mask.sum() > 0 for r in results] == [True, True, True]
    check_segments_match(fake_session, scene, volume_node)
    fake_session.set_absent_masks(volume_node, False)
    assert results[1].finding.mask.sum() == 0
    check_segments_match(fake_session, scene, volume_node)
    seg = fake_session.segmentation_node(volume_node)
    s = seg.GetSegmentation().GetSegment(results[0].segment_id)
    np.testing.assert_allclose(s.GetColor(), np.array(results[0].finding.color) / 255.0)
    # terminology of a known concept carries its SNOMED type; a sided finding its laterality
    entry = assert_terminology_parses(s.GetTerminology())
    assert entry.GetTypeObject().GetCodeMeaning()
    effusion = assert_terminology_parses(seg.GetSegmentation().GetSegment(results[1].segment_id).GetTerminology())
    assert effusion.GetTypeObject().GetCodeValue()
    assert effusion.GetRegionModifierObject().GetCodeMeaning() == "Left"  # laterality reaches DICOM SEG
    liver = assert_terminology_parses(seg.GetSegmentation().GetSegment(results[2].segment_id).GetTerminology())
    assert (liver.GetTypeObject().GetCodingSchemeDesignator(), liver.GetTypeObject().GetCodeValue()) == ("SCT", "10200004")
    # jump target lies inside the finding (RAS of the mask centroid)
    centre = fake_session.jump_target_ras(volume_node, 0)
    expected = mrml_glue.mask_center_ras(results[0].finding.mask, IJK_TO_RAS)
    assert np.linalg.norm(np.subtract(centre, expected)) < 3.0


def test_table_holds_the_numbers(fake_session, scene, volume_node):
    fake_session.encode_inline(volume_node)
    results = fake_session.run_prompts(volume_node, "liver lesion; fluid around the left lung; liver")
    rows = results_table.table_rows(fake_session.table_node(volume_node))
    assert [r["prompt"] for r in rows] == [r.prompt for r in results]
    for row, r in zip(rows, results):
        f = r.finding
        assert row["anatomy"] == f.anatomy
        assert row["segment_id"] == r.segment_id
        if f.probability is None:
            assert np.isnan(row["probability"])
        else:
            assert row["probability"] == pytest.approx(f.probability, abs=1e-12)
        assert row["prompt_confidence"] == pytest.approx(f.prompt_confidence)
        assert row["volume_ml"] == pytest.approx(f.volume_ml)
    assert fake_session.table_node(volume_node).GetAttribute("CTLanguage.ModelId") == "default"
    assert [results_table.panel_texts(r.finding)[2] for r in results] == ["0.83 (uncalibrated)", "0.21 (uncalibrated)", "—"]


def test_thresholds_update_without_reencoding(fake_session, scene, volume_node):
    fake_session.encode_inline(volume_node)
    fake_session.run_prompts(volume_node, "liver lesion; fluid around the left lung")
    before = [r.answer.mask.sum() for r in fake_session.results(volume_node)]
    fake_session.set_thresholds(volume_node, mask_threshold=0.2, probability_threshold=0.5)
    after = [r.answer.mask.sum() for r in fake_session.results(volume_node)]
    assert all(a > b for a, b in zip(after, before))
    assert encode_count() == 1
    check_segments_match(fake_session, scene, volume_node)
    display = fake_session.segmentation_node(volume_node).GetDisplayNode()
    r0, r1 = fake_session.results(volume_node)
    assert display.GetSegmentVisibility(r0.segment_id)          # p = 0.83 >= 0.5
    assert not display.GetSegmentVisibility(r1.segment_id)      # p = 0.21 < 0.5
    fake_session.set_thresholds(volume_node, probability_threshold=0.1)
    assert display.GetSegmentVisibility(r1.segment_id)
    fake_session.set_result_visible(volume_node, 0, False)
    assert not display.GetSegmentVisibility(r0.segment_id)
    with pytest.raises(ValueError):
        fake_session.set_thresholds(volume_node, mask_threshold=1.5)


def test_rerunning_a_prompt_replaces_its_segment(fake_session, scene, volume_node):
    fake_session.encode_inline(volume_node)
    fake_session.run_prompts(volume_node, "liver lesion")
    fake_session.run_prompts(volume_node, "liver lesion; liver")
    seg = fake_session.segmentation_node(volume_node)
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    assert fake_session.history[:2] == ["liver lesion", "liver"]


def test_prompt_errors_are_value_errors(fake_session, volume_node):
    with pytest.raises(ValueError, match="Encode"):
        fake_session.run_prompts(volume_node, "liver")
    fake_session.encode_inline(volume_node)
    with pytest.raises(ValueError):
        fake_session.run_prompts(volume_node, " ; ;")


def test_seg_nrrd_through_storage_node_reads_back_identical(fake_session, scene, volume_node, tmp_path):
    fake_session.encode_inline(volume_node)
    results = fake_session.run_prompts(volume_node, "liver lesion; fluid around the left lung; liver")
    path = exports.export_seg_nrrd(fake_session, volume_node, str(tmp_path / "findings.seg.nrrd"))
    original = fake_session.segmentation_node(volume_node).GetSegmentation()
    loaded = mrml_glue.load_segmentation(scene, path)
    seg2 = loaded.GetSegmentation()
    assert seg2.GetNumberOfSegments() == len(results)
    for r in results:
        a, b = original.GetSegment(r.segment_id), seg2.GetSegment(r.segment_id)
        assert b is not None and b.GetName() == a.GetName()
        np.testing.assert_allclose(b.GetColor(), a.GetColor(), atol=1e-6)
        assert b.GetTerminology() == a.GetTerminology()
        back = mrml_glue.segment_mask_on_reference(scene, loaded, r.segment_id, volume_node)
        assert np.array_equal(back, r.finding.mask)


def test_heatmap_volume_on_source_grid(fake_session, scene, volume_node):
    fake_session.encode_inline(volume_node)
    fake_session.run_prompts(volume_node, "liver lesion")
    node = fake_session.show_heatmap(volume_node, 0)
    np.testing.assert_array_equal(mrml_glue.ijk_to_ras_of_node(node), IJK_TO_RAS)
    np.testing.assert_allclose(mrml_glue.array_from_volume_node(node),
                               fake_session.results(volume_node)[0].finding.heatmap())
    color = scene.GetNodeByID(node.GetDisplayNode().GetColorNodeID())
    assert color.GetName() == mrml_glue.HEATMAP_COLOR_NODE_NAME and color.GetNumberOfColors() == 256
    assert fake_session.show_heatmap(volume_node, 0).GetID() == node.GetID()  # reused


def test_findings_csv_json_and_html_exports(fake_session, volume_node, tmp_path):
    pytest.importorskip("ctlanguage.exports.findings_table")
    import json

    fake_session.encode_inline(volume_node)
    fake_session.run_prompts(volume_node, "liver lesion; liver")
    j = exports.export_findings(fake_session, volume_node, str(tmp_path / "f.json"))
    doc = json.loads(Path(j).read_text())
    assert doc["model"]["id"] == "fake-model" and len(doc["model"]["sha256"]) == 64 and doc["mask_threshold"] == 0.5
    assert [f["prompt"] for f in doc["findings"]] == ["liver lesion", "liver"]
    c = exports.export_findings(fake_session, volume_node, str(tmp_path / "f.csv"))
    assert "liver lesion" in Path(c).read_text()
    h = exports.export_html_report(fake_session, volume_node, str(tmp_path / "r.html"))
    assert "liver lesion" in Path(h).read_text(encoding="utf-8")
    with pytest.raises(ValueError):
        exports.export_findings(fake_session, volume_node, str(tmp_path / "missing" / "f.csv"))


# ----------------------------------------------------------------------------------------------
# background process: progress, cancel, failure (stub worker scripts; no engine needed)
# ----------------------------------------------------------------------------------------------

def _stub_worker(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "stub_worker.py"
    script.write_text(textwrap.dedent("""
        import argparse, os, sys, time
        p = argparse.ArgumentParser()
        for a in ("--input", "--geometry", "--model", "--device", "--output", "--cancel-file"):
            p.add_argument(a)
        a = p.parse_args()
        def say(s):
            print(s, flush=True)
    """) + textwrap.dedent(body))
    return script


def test_signal_class():
    s = signals.Signal()
    got = []
    s.connect(got.append)
    s.connect(got.append)  # connected once
    s.emit(1)
    s.disconnect(got.append)
    s.emit(2)
    assert got == [1]


def test_cancelled_encoding_leaves_scene_unchanged(fake_session, scene, volume_node, tmp_path):
    script = _stub_worker(tmp_path, """
        for n in range(600):
            if os.path.exists(a.cancel_file):
                say("CTLANGUAGE_ERROR cancelled by the user"); sys.exit(3)
            say(f"CTLANGUAGE_PROGRESS {n/600:.3f} step {n}")
            time.sleep(0.05)
        say("CTLANGUAGE_DONE " + a.output)
    """)
    snapshot = mrml_glue.SceneSnapshot.take(scene)
    progress, done = [], []
    job = fake_session.start_encoding(volume_node, worker_script=script, on_progress=lambda f, m: progress.append(f),
                                      on_done=lambda state, msg: done.append(state))
    work = job.work_dir
    assert (work / "volume.npy").exists()
    t0 = time.monotonic()
    while len(progress) < 3 and time.monotonic() - t0 < 20:
        job.poll()
        time.sleep(0.05)
    assert len(progress) >= 3, job.log
    job.cancel()
    while job.poll():
        time.sleep(0.05)
    assert job.state == "cancelled" and done == ["cancelled"]
    assert not work.exists()
    assert mrml_glue.SceneSnapshot.take(scene) == snapshot
    assert not fake_session.is_encoded(volume_node)


def test_worker_that_ignores_cancel_is_killed(tmp_path, volume_node):
    script = _stub_worker(tmp_path, """
        say("CTLANGUAGE_PROGRESS 0.1 stuck")
        time.sleep(60)
    """)
    vol = mrml_glue.volume_node_to_ctvolume(volume_node)
    job = background.EncodingJob(vol, worker_script=script, cancel_grace_s=0.3).start()
    time.sleep(0.3)
    job.cancel()
    t0 = time.monotonic()
    while job.poll():
        time.sleep(0.05)
    assert job.state == "cancelled" and time.monotonic() - t0 < 10


def test_worker_error_becomes_failed_state_with_message(tmp_path, volume_node):
    script = _stub_worker(tmp_path, """
        say("CTLANGUAGE_ERROR The checkpoint is corrupt (sha256 mismatch).")
        sys.exit(2)
    """)
    vol = mrml_glue.volume_node_to_ctvolume(volume_node)
    job = background.EncodingJob(vol, worker_script=script)
    failed = []
    job.failed.connect(failed.append)
    with pytest.raises(ValueError, match="sha256"):
        job.start(waitForCompletion=True)
    assert failed == ["The checkpoint is corrupt (sha256 mismatch)."]


def test_worker_crash_is_reported(tmp_path, volume_node):
    script = _stub_worker(tmp_path, """
        say("about to crash")
        raise SystemExit(7)
    """)
    job = background.EncodingJob(mrml_glue.volume_node_to_ctvolume(volume_node), worker_script=script)
    with pytest.raises(ValueError, match="exit code 7"):
        job.start(waitForCompletion=True)


def test_injected_process_object_drives_the_state_machine(volume_node):
    class FakeProcess:
        def __init__(self):
            self.lines = ["CTLANGUAGE_PROGRESS 0.5 half", "noise", "CTLANGUAGE_DONE /tmp/enc"]
            self.rc = None
            self.argv = None

        def start(self, argv, env):
            self.argv = argv

        def read_lines(self):
            out, self.lines = self.lines, []
            self.rc = 0
            return out

        def returncode(self):
            return self.rc

        def kill(self):
            pass

        def wait(self, timeout=None):
            return self.rc

    job = background.EncodingJob(mrml_glue.volume_node_to_ctvolume(volume_node), process_factory=FakeProcess,
                                 model="ctlanguage-synth-v2", device="cpu")
    seen, finished = [], []
    job.progress.connect(lambda f, m: seen.append((f, m)))
    job.finished.connect(finished.append)
    job.start(waitForCompletion=True, poll_interval_s=0.0)
    assert job.state == "finished" and finished == ["/tmp/enc"]
    assert (0.5, "half") in seen and seen[-1][0] == 1.0
    assert "--model" in job.process.argv and "ctlanguage-synth-v2" in job.process.argv
    assert job.process.argv[job.process.argv.index("--device") + 1] == "cpu"
    job.discard()


# ----------------------------------------------------------------------------------------------
# the real engine (embedded default model)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_engine_and_spec(tmp_path_factory):
    """The real engine: the embedded default model when present, else the same network with
    random weights saved to a temporary folder (exercises the real encode/query/save/load path
    and the worker process; masks and probabilities are then meaningless but still exact)."""
    try:
        from ctlanguage.engine import Engine
    except Exception as exc:  # pragma: no cover - depends on what is installed
        pytest.skip(f"ctlanguage.engine not importable: {exc}")
    try:
        return Engine.load(model="default", device="cpu"), "default"
    except Exception as exc:
        default_error = exc
    try:
        import torch
        from ctlanguage.model import GroundedCTModel, ModelConfig

        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp("untrained_model")
        GroundedCTModel(ModelConfig(model_id="ctlanguage-untrained-test")).save_pretrained(folder)
        return Engine.load(model=str(folder), device="cpu"), str(folder)
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"default model not available ({default_error}) and no untrained stand-in ({exc})")


@pytest.fixture(scope="module")
def real_engine(real_engine_and_spec):
    return real_engine_and_spec[0]


@pytest.fixture(scope="module")
def phantom_volume():
    try:
        from ctlanguage.phantom import generate_case
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"phantom generator not available: {exc}")
    case = generate_case(7)
    return np.asarray(case.volume), np.asarray(case.ijk_to_ras, dtype=float)


def _usable_mask_threshold(engine, encoding, prompt: str = "liver") -> float:
    """0.5 when the model gives a non-empty mask for ``prompt`` there; otherwise (preliminary or
    random-weight checkpoints) a threshold inside the prompt's own heat-map range, so that the
    exactness checks run on non-empty, model-shaped masks whatever the checkpoint's quality."""
    finding = engine.query(encoding, prompt, mask_threshold=0.5)[0]
    if finding.mask.any():
        return 0.5
    heat = finding.heatmap()
    positive = heat[heat > 0]
    t = float(np.quantile(positive, 0.9)) if positive.size else 0.5
    return float(min(max(t, 0.01), 0.49))


def _reorient(array, ijk_to_ras):
    """Same anatomy in a non-RAS voxel order: swap i<->k, flip j, coarser k spacing kept."""
    arr = np.ascontiguousarray(np.flip(np.transpose(array, (2, 1, 0)), axis=1))  # [i, j', k] as new [k,j,i]
    nk, nj, ni = arr.shape
    m = np.asarray(ijk_to_ras, dtype=float)
    # new index (i', j', k') = old (k, nj-1-j, i)  ->  old ijk = (k', nj-1-j', i')
    p = np.zeros((4, 4))
    p[0, 2] = 1.0
    p[1, 1] = -1.0
    p[1, 3] = nj - 1
    p[2, 0] = 1.0
    p[3, 3] = 1.0
    new = m @ p
    new[:3, 3] += (13.0, -27.5, 41.0)  # offset origin
    return arr, new


def test_real_engine_flow_on_awkward_volume(real_engine_and_spec, phantom_volume, scene):
    real_engine, spec = real_engine_and_spec
    array, affine = _reorient(*phantom_volume)
    node = mrml_glue.ctvolume_to_volume_node(scene, SimpleNamespace(array=array, ijk_to_ras=affine), "phantom")
    assert not np.allclose(np.abs(affine[:3, :3]), np.diag(np.abs(np.diag(affine[:3, :3]))))  # not diagonal
    session = CTLanguageSession(scene, engine_loader=lambda m, d: real_engine)
    session.set_model(spec, "cpu")
    session.encode_inline(node)
    session.mask_threshold = _usable_mask_threshold(real_engine, session.state_for(node).encoding)
    results = session.run_prompts(node, "liver; fluid around the left lung; liver lesion")
    assert len(results) == 3
    for r in results:
        assert r.finding.mask.dtype == np.uint8 and r.finding.mask.shape == array.shape
    print("mask voxels:", [int(r.finding.mask.sum()) for r in results], "model:", spec,
          "mask threshold:", session.mask_threshold)
    assert results[0].finding.mask.sum() > 0, "the liver prompt gave an empty mask"
    check_segments_match(session, scene, node)
    rows = results_table.table_rows(session.table_node(node))
    for row, r in zip(rows, results):
        p = r.finding.probability
        assert (np.isnan(row["probability"]) if p is None else row["probability"] == pytest.approx(p))
        assert row["volume_ml"] == pytest.approx(r.finding.volume_ml)


def test_real_engine_background_process_matches_inline(real_engine_and_spec, phantom_volume, scene):
    """Encode through the worker process (as the GUI does) and in-process: same findings."""
    real_engine, spec = real_engine_and_spec
    array, affine = _reorient(*phantom_volume)
    node = mrml_glue.ctvolume_to_volume_node(scene, SimpleNamespace(array=array, ijk_to_ras=affine), "phantom bg")
    session = CTLanguageSession(scene, engine_loader=lambda m, d: real_engine)
    session.set_model(spec, "cpu")
    snapshot = mrml_glue.SceneSnapshot.take(scene)
    progress, done = [], []
    job = session.start_encoding(node, waitForCompletion=True, on_progress=lambda f, m: progress.append(f),
                                 on_done=lambda state, msg: done.append((state, msg)))
    assert done == [("finished", "")], (done, job.log[-10:])
    assert job.state == "finished" and progress and progress[-1] == 1.0
    assert not job.work_dir.exists()  # the saved encoding was loaded, then the work folder removed
    assert mrml_glue.SceneSnapshot.take(scene) == snapshot  # encoding alone does not touch the scene
    session.mask_threshold = _usable_mask_threshold(real_engine, session.state_for(node).encoding)
    bg = session.run_prompts(node, "liver; liver lesion")
    inline_session = CTLanguageSession(scene, engine_loader=lambda m, d: real_engine)
    inline_session.set_model(spec, "cpu")
    inline_session.mask_threshold = session.mask_threshold
    inline_session.encode_inline(node)
    inline = inline_session.run_prompts(node, "liver; liver lesion")
    assert bg[0].finding.mask.sum() > 0
    for a, b in zip(bg, inline):
        assert a.prompt == b.prompt
        total = int(a.finding.mask.sum()) + int(b.finding.mask.sum())
        dice = 1.0 if total == 0 else 2 * np.logical_and(a.finding.mask, b.finding.mask).sum() / total
        assert dice > 0.99, (a.prompt, dice)
        if a.finding.probability is not None:
            assert a.finding.probability == pytest.approx(b.finding.probability, abs=1e-3)
    check_segments_match(session, scene, node)


def test_changing_the_model_drops_encodings(fake_session, volume_node):
    fake_session.encode_inline(volume_node)
    fake_session.set_model("default", "auto")  # same model: encoding kept
    assert fake_session.is_encoded(volume_node)
    fake_session.set_model("/some/other/model", "cpu")
    assert not fake_session.is_encoded(volume_node)
    with pytest.raises(ValueError, match="Encode"):
        fake_session.run_prompts(volume_node, "liver")
    assert fake_session.model_label() == "research use only — model: /some/other/model"


# ----------------------------------------------------------------------------------------------
# CTLanguageLogic itself (CTLanguage.py) with the Slicer-application-only imports stubbed
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def module_logic(monkeypatch, scene):
    """Import CTLanguage.py with stand-ins for what only the Slicer application provides
    (Qt, CTK, ScriptedLoadableModule base classes, parameterNodeWrapper); MRML stays real."""
    import types
    from unittest import mock

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class _Base:
        def __init__(self, *a, **k):
            pass

    class Logic(_Base):
        def getParameterNode(self):
            return scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class Widget(_Base):
        def __init__(self, parent=None):
            self.parent = mock.MagicMock()
            self.layout = mock.MagicMock()

        def setup(self):
            pass

        def resourcePath(self, rel):
            return str(ROOT / "CTLanguage" / "Resources" / rel)

    slm.ScriptedLoadableModule = slm.ScriptedLoadableModuleTest = _Base
    slm.ScriptedLoadableModuleWidget = Widget
    slm.ScriptedLoadableModuleLogic = Logic
    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    def _wrapper(cls):  # the real decorator adds typed properties over the vtkMRMLScriptedModuleNode
        def __init__(self, node):
            self.parameterNode = node
            for name in cls.__annotations__:
                if not hasattr(cls, name):
                    setattr(self, name, None)  # unset node references read as None

        cls.__init__ = __init__
        cls.connectGui = lambda self, ui: "gui-tag"
        cls.disconnectGui = lambda self, tag: None
        cls.AddObserver = lambda self, event, method, priority=0.0: self.parameterNode.AddObserver(event, method, priority)
        cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
        return cls

    pnw.parameterNodeWrapper = _wrapper
    pnw.Choice = lambda choices: ("Choice", tuple(choices))
    pnw.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
    monkeypatch.setitem(sys.modules, "qt", mock.MagicMock())
    monkeypatch.setitem(sys.modules, "ctk", mock.MagicMock())
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "CTLanguage"))
    sys.modules.pop("CTLanguage", None)
    import CTLanguage as module

    _fake_engine.FakeBackend.calls = []
    engine = _fake_engine.fake_engine()
    logic = module.CTLanguageLogic(engineLoader=lambda m, d: engine)
    yield module, logic
    sys.modules.pop("CTLanguage", None)


def test_module_logic_flow_and_exports(module_logic, scene, volume_node, tmp_path):
    module, logic = module_logic
    logic.setModel("default", "auto")
    with pytest.raises(ValueError):
        logic.encode(None)
    logic.encodeInline(volume_node)
    results = logic.runPrompts(volume_node, "liver lesion; liver")
    assert len(results) == 2
    logic.setThresholds(volume_node, 0.3, 0.9)
    phrases = logic.completionPhrases()
    assert phrases[:2] == ["liver lesion", "liver"] and len(phrases) > 20  # history first, then vocabulary
    for kind, suffix in (("segnrrd", ".seg.nrrd"), ("csv", ".csv"), ("json", ".json"), ("html", ".html")):
        path = logic.export(volume_node, str(tmp_path), kind)
        assert path.endswith(suffix) and Path(path).stat().st_size > 0
    with pytest.raises(ValueError, match="does not exist"):
        logic.export(volume_node, str(tmp_path / "nope"), "csv")
    with pytest.raises(ValueError):
        logic.export(volume_node, str(tmp_path), "pdf")
    with pytest.raises(ValueError, match="DICOM"):  # volume not loaded from DICOM
        logic.export(volume_node, str(tmp_path), "dicomseg")
    params = logic.getParameterNode()
    assert params.parameterNode.IsA("vtkMRMLScriptedModuleNode")
    assert params.maskThreshold == 0.5 and params.device == "auto"  # declared defaults
    fields = module.CTLanguageParameterNode.__annotations__
    assert set(fields) == {"inputVolume", "device", "probabilityThreshold", "maskThreshold", "showHeatmap",
                           "showAbsentMasks", "outputDirectory"}
    assert params.showAbsentMasks is False and not logic.thresholdsDiffer(0.3, 0.9, False)
    # the checkbox's path: the effusion (judged absent by the stand-in) is drawn empty until
    # absent masks are switched on, and again after they are switched off
    effusion = logic.runPrompts(volume_node, "fluid around the left lung")[-1]
    assert effusion.finding.mask_suppressed and effusion.finding.mask.sum() == 0
    assert logic.thresholdsDiffer(0.3, 0.9, True)
    logic.setThresholds(volume_node, 0.3, 0.9, True)
    assert not logic.thresholdsDiffer(0.3, 0.9, True) and logic.results(volume_node)[-1].finding.mask.sum() > 0
    logic.setThresholds(volume_node, 0.3, 0.9, False)
    assert logic.results(volume_node)[-1].finding.mask.sum() == 0


def test_module_widget_wiring_smoke(module_logic, monkeypatch, scene, volume_node, tmp_path):
    """Drive CTLanguageWidget with a mock UI (widget names are checked statically elsewhere):
    catches wrong method/attribute names on the logic/session side of every handler."""
    from contextlib import contextmanager
    from unittest import mock

    module, logic = module_logic
    ui = mock.MagicMock()
    ui.modelComboBox.findData.return_value = 0
    ui.modelComboBox.currentData = "default"
    ui.modelComboBox.count = 1
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda w: ui, raising=False)
    errors = []

    @contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:  # the real one shows a dialog and re-raises
            errors.append((message, exc))
            raise

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display, raising=False)
    monkeypatch.setattr(module, "CTLanguageLogic", lambda: logic)
    widget = module.CTLanguageWidget()
    widget.setup()
    assert widget._parameterNode is not None
    widget._parameterNode.inputVolume = volume_node
    widget._parameterNode.outputDirectory = tmp_path
    logic.encodeInline(volume_node)
    widget.updateGUIFromState()
    widget.runPromptText("liver lesion; fluid around the left lung")
    assert [r.prompt for r in logic.results(volume_node)] == ["liver lesion", "fluid around the left lung"]
    ui.resultsTable.setRowCount.assert_called_with(2)
    widget._parameterNode.maskThreshold = 0.3
    widget.onParameterNodeModified()
    widget._thresholdTimer.start.assert_called()  # debounced
    widget.applyThresholds()                       # what the timer's timeout() runs
    assert not logic.thresholdsDiffer(0.3, 0.5)
    widget.onExport("csv")
    assert (tmp_path / "CT awkward_ctlanguage.csv").is_file()
    monkeypatch.setattr(widget, "selectedRow", lambda: 0)
    jumps = []
    monkeypatch.setattr(slicer, "modules", SimpleNamespace(markups=SimpleNamespace(
        logic=lambda: SimpleNamespace(JumpSlicesToLocation=lambda *a: jumps.append(a)))), raising=False)
    widget.onResultSelected()
    assert jumps and len(jumps[0]) == 4
    widget.onRemoveResult()
    assert len(logic.results(volume_node)) == 1
    widget.onClearHistory()
    widget.cleanup()
    assert not errors, errors


# ----------------------------------------------------------------------------------------------
# model catalog helpers behind "Manage models…"
# ----------------------------------------------------------------------------------------------

def test_catalog_ui_local_checkpoints_and_cache(real_engine_and_spec, monkeypatch, tmp_path):
    from CTLanguageLib import catalog_ui

    engine, spec = real_engine_and_spec
    monkeypatch.setenv("CTLANGUAGE_CACHE", str(tmp_path / "cache"))
    folder = str(engine.model_dir)
    choices = catalog_ui.model_choices()
    assert choices and choices[0].spec  # the catalog's (embedded) default first
    with pytest.raises(ValueError, match="not a usable"):
        catalog_ui.add_local_checkpoint(tmp_path)
    assert catalog_ui.add_local_checkpoint(folder) == str(Path(folder).resolve())
    assert catalog_ui.add_local_checkpoint(folder) == str(Path(folder).resolve())  # once only
    local = [c for c in catalog_ui.model_choices() if c.spec == str(Path(folder).resolve())]
    assert len(local) == 1 and local[0].available
    fake = tmp_path / "cache" / "models" / "x" / "1.0"
    fake.mkdir(parents=True)
    (fake / "model.safetensors").write_bytes(b"0" * 1000)
    assert catalog_ui.clear_cache() == 1000
    assert not (tmp_path / "cache" / "models").exists()
    assert catalog_ui.local_models() == [str(Path(folder).resolve())]  # the list survives a clear


def test_real_engine_mask_threshold_update_matches_a_fresh_query(real_engine_and_spec, phantom_volume, scene):
    real_engine, spec = real_engine_and_spec
    array, affine = phantom_volume
    node = mrml_glue.ctvolume_to_volume_node(scene, SimpleNamespace(array=array, ijk_to_ras=affine), "phantom thr")
    session = CTLanguageSession(scene, engine_loader=lambda m, d: real_engine)
    session.set_model(spec, "cpu")
    session.encode_inline(node)
    session.run_prompts(node, "liver; liver lesion")
    session.set_thresholds(node, mask_threshold=0.3, probability_threshold=0.5)
    enc = session.state_for(node).encoding
    answers = real_engine.query(enc, "liver; liver lesion", mask_threshold=0.3, absent_masks=True)
    drawn = real_engine.query(enc, "liver; liver lesion", mask_threshold=0.3)  # the engine's default rule
    for r, a, d in zip(session.results(node), answers, drawn):
        assert np.array_equal(r.answer.mask, a.mask), r.prompt        # every mask is kept
        assert np.array_equal(r.finding.mask, d.mask), r.prompt       # drawn as the engine judges
        assert r.finding.mask_suppressed == d.mask_suppressed
        assert r.finding.probability == a.probability
    check_segments_match(session, scene, node)


def test_slicer_glue_self_test_file_runs_on_slicer_core(monkeypatch, scene):
    """CTLanguage/Testing/Python/CTLanguageGlueSelfTest.py (registered for Slicer builds) runs here
    too, with slicer.mrmlScene pointed at a slicer-core scene."""
    import importlib.util
    import unittest

    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    path = ROOT / "CTLanguage" / "Testing" / "Python" / "CTLanguageGlueSelfTest.py"
    spec = importlib.util.spec_from_file_location("CTLanguageGlueSelfTest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = unittest.TextTestRunner(verbosity=0).run(mod.CTLanguageGlueSelfTest("runTest"))
    assert result.wasSuccessful(), result.failures + result.errors


def test_masks_touching_the_grid_border_single_voxels_and_empty_masks_are_exact(scene, volume_node):
    """The glue ships only each mask's bounding box: edges, corners and empty masks must stay exact."""
    shape = SHAPE
    cases = {}
    m = np.zeros(shape, np.uint8)
    m[0, :, 0] = 1
    m[-1, -1, :] = 1
    cases["border"] = m
    m = np.zeros(shape, np.uint8)
    m[-1, -1, -1] = 1
    cases["corner"] = m
    cases["empty"] = np.zeros(shape, np.uint8)
    cases["full"] = np.ones(shape, np.uint8)
    seg = mrml_glue.new_segmentation_node(scene, volume_node)
    for name, mask in cases.items():
        f = make_finding(name, mask, color=(51, 102, 153))
        sid = mrml_glue.add_finding_segment(seg, f, volume_node)
        assert np.array_equal(mrml_glue.segment_mask_on_reference(scene, seg, sid, volume_node), mask), name
    # replacing a non-empty segment by an empty mask clears it
    f = make_finding("full", np.zeros(shape, np.uint8))
    mrml_glue.add_finding_segment(seg, f, volume_node, segment_id="full")
    assert mrml_glue.segment_mask_on_reference(scene, seg, "full", volume_node).sum() == 0
    with pytest.raises(ValueError, match="grid"):
        mrml_glue.set_segment_mask(seg, "full", np.zeros((2, 2, 2), np.uint8), volume_node)


def test_segments_added_after_the_3d_surface_exists_get_a_correct_surface(scene, volume_node):
    """Closed surfaces (3D view) of a segment added after the surfaces were created equal those of
    the same mask in a segmentation that never had surfaces before it (once: doubled surface)."""
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()

    def finding(name, box):
        m = np.zeros(SHAPE, np.uint8)
        m[box] = 1
        return make_finding(name, m, color=(230, 25, 25), probability=0.5, anatomy="liver")

    first = finding("first", (slice(2, 10), slice(5, 20), slice(5, 20)))
    second = finding("second", (slice(8, 16), slice(20, 35), slice(10, 28)))
    ref = mrml_glue.new_segmentation_node(scene, volume_node, "reference")
    sid = mrml_glue.add_finding_segment(ref, second, volume_node)
    ref.CreateClosedSurfaceRepresentation()
    want = ref.GetSegmentation().GetSegment(sid).GetRepresentation(surface).GetNumberOfPoints()
    assert want > 0
    seg = mrml_glue.new_segmentation_node(scene, volume_node, "late")
    mrml_glue.add_finding_segment(seg, first, volume_node)
    seg.CreateClosedSurfaceRepresentation()
    sid = mrml_glue.add_finding_segment(seg, second, volume_node)
    got = seg.GetSegmentation().GetSegment(sid).GetRepresentation(surface)
    assert got is not None and got.GetNumberOfPoints() == want
    assert np.array_equal(mrml_glue.segment_mask_on_reference(scene, seg, sid, volume_node), second.mask)


# ----------------------------------------------------------------------------------------------
# the logic front (CTLanguageLib/logic.py) and the worker line protocol
# ----------------------------------------------------------------------------------------------

def test_worker_line_protocol_round_trips():
    line = worker_process.format_progress(0.25, "Encoding\nimage")
    assert "\n" not in line
    assert worker_process.parse_line(line) == ("progress", (0.25, "Encoding image"))
    assert worker_process.parse_line(worker_process.format_progress(7.0)) == ("progress", (1.0, ""))
    assert worker_process.parse_line(worker_process.format_line(worker_process.DONE_TAG, "/x/e.enc")) == ("done", "/x/e.enc")
    assert worker_process.parse_line(worker_process.format_line(worker_process.ERROR_TAG, "bad")) == ("error", "bad")
    assert worker_process.parse_line("CTLANGUAGE_PROGRESS nan-ish") is None
    assert worker_process.parse_line("torch warning") == ("log", "torch warning")
    assert worker_process.parse_line("   ") is None
    env = worker_process.worker_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT / "CTLanguage")


def test_logic_front_results_colours_history_and_reset(scene, volume_node, fake_engine, tmp_path):
    logic = Logic(scene, engineLoader=lambda m, d: fake_engine)
    assert not logic.isEncoding() and not logic.isEncoded(volume_node)
    logic.cancelEncoding()  # nothing running: no error
    with pytest.raises(ValueError, match="Encode"):
        logic.runPrompts(volume_node, "liver")
    logic.encodeInline(volume_node)
    results = logic.runPrompts(volume_node, "liver lesion|liver")  # the engine's separators
    assert [r.prompt for r in results] == ["liver lesion", "liver"]
    assert logic.segmentationNode(volume_node).GetDisplayNode().GetSegmentOpacity2DFill(results[0].segment_id) \
        == pytest.approx(0.35)
    logic.setSegmentColor(volume_node, 1, (0.1, 0.2, 0.3))
    np.testing.assert_allclose(logic.segmentColor(volume_node, 1), (0.1, 0.2, 0.3))
    assert logic.thresholdsDiffer(0.3, 0.5) and not logic.thresholdsDiffer(0.5, 0.5)
    logic.setResultVisible(volume_node, 0, False)
    assert not logic.segmentationNode(volume_node).GetDisplayNode().GetSegmentVisibility(results[0].segment_id)
    assert logic.jumpTarget(volume_node, 1) is not None
    assert logic.showHeatmap(volume_node, 0).GetImageData() is not None
    assert logic.completionPhrases()[:2] == ["liver lesion", "liver"]
    unknown = logic.runPrompts(volume_node, "florbix wuggle")[-1]  # not understood: no mask, no number
    assert not unknown.finding.understood and unknown.finding.probability is None
    assert mrml_glue.segment_mask_on_reference(scene, logic.segmentationNode(volume_node), unknown.segment_id,
                                               volume_node).sum() == 0
    assert results_table.panel_texts(unknown.finding)[1].startswith("not understood — try '")
    logic.setModel("default", "cpu")
    logic.resetSession()  # scene closed: results and encodings go, model and history stay
    assert logic.results(volume_node) == [] and not logic.isEncoded(volume_node)
    assert logic.completionPhrases()[:3] == ["florbix wuggle", "liver lesion", "liver"]
    logic.clearHistory()
    assert "liver lesion" not in logic.completionPhrases()[:1]
    with pytest.raises(ValueError, match="Nothing to export"):
        logic.export(volume_node, str(tmp_path), "csv")
    with pytest.raises(ValueError, match="Select"):
        logic.export(None, str(tmp_path), "csv")


@pytest.mark.slow
def test_in_slicer_self_test_flow_runs_on_slicer_core(module_logic, monkeypatch, real_engine_and_spec):
    """CTLanguageLib/self_test.py (what CTLanguageTest runs inside Slicer) with the module's own
    CTLanguageLogic, the worker process and the embedded model, on a slicer-core scene."""
    import unittest

    from CTLanguageLib import self_test

    module, _fake_logic = module_logic
    if real_engine_and_spec[1] != "default":
        pytest.skip("the self-test uses the embedded default model")
    logic = module.CTLanguageLogic()  # no injected engine: Engine.load("default") as in Slicer
    monkeypatch.setattr(logic, "setupPythonRequirements", lambda ask=True: None)  # pip: Slicer only

    class Case(unittest.TestCase):
        def runTest(self):
            pass

        def delayDisplay(self, message, msec=None):  # noqa: N802 - ScriptedLoadableModuleTest's name
            pass

    self_test.prompt_flow(Case(), logic)


def test_a_negated_prompt_shows_the_finding_only_when_it_is_likely_present():
    """'no pleural effusion' answers P(absent); its segment is the effusion, shown by P(present)."""
    from types import SimpleNamespace

    from CTLanguageLib import mrml_glue

    likely_absent = SimpleNamespace(probability=0.9, probability_present=0.1)
    likely_present = SimpleNamespace(probability=0.1, probability_present=0.9)
    anatomy = SimpleNamespace(probability=None, probability_present=None)
    assert not mrml_glue.finding_visible(likely_absent, 0.5)
    assert mrml_glue.finding_visible(likely_present, 0.5)
    assert mrml_glue.finding_visible(anatomy, 0.5)

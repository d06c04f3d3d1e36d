"""The backend contract (ctlanguage.engine.protocol) checked against the real embedded backend and
the test double (Testing/_fake_engine.py) alike, the engine's composition of two backends, and the
import direction of the engine package.

In detail, for both: runtime-checkable Protocols; ``describe(entry)`` (no weights) says what the
loaded backend says; every answer keeps the mask contract (float32 logits exactly the shape of the
``preprocess.ModelGrid`` they name, or a 0/1 uint8 mask exactly on the source grid), scores only
for the anatomies asked, in [0, 1] when calibrated; the state survives JSON + tensor round trips
with identical answers; through the real Engine the findings land on the source grid, name the
backend that made them, and survive an encoding file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ctlanguage.engine import (Answer, Backend, BackendState, Capabilities, ConceptMatcher, Engine,
                               Finding, ModelInfo, Request)
from ctlanguage.preprocess import ModelGrid
from ctlanguage.volume import CTVolume




def check_backend(backend, volume) -> None:
    """What every backend promises, whatever its family."""
    assert isinstance(backend, Backend)
    assert isinstance(backend.info, ModelInfo) and backend.info.id and backend.info.sha256
    assert isinstance(backend.capabilities, Capabilities)
    state = backend.encode(volume)
    assert isinstance(state, BackendState)
    assert state.nbytes() > 0
    restored = backend.restore(state.metadata(), dict(state.tensors()))
    caps = backend.capabilities
    for key in caps.anatomy[:3]:
        for st in (state, restored):
            ans = backend.answer(st, Request(text=key, kind="anatomy", anatomies=(key,)))
            assert isinstance(ans, Answer) and ans.model == backend.info.id
            if ans.mask is not None:
                assert ans.mask.shape == volume.shape and ans.mask.dtype == np.uint8
            else:
                assert ans.logit.dtype == np.float32 and tuple(ans.logit.shape) == tuple(ans.grid.shape)
    if caps.scores:
        req = Request(text="pleural effusion", kind="finding",
                      anatomies=("pleural_space_left", "pleural_space_right"),
                      finding="pleural_effusion", want_mask=False)
        ans = backend.answer(state, req)
        assert set(ans.scores) == set(req.anatomies)
        assert all(0.0 <= v <= 1.0 for v in ans.scores.values()) or not ans.calibrated
        assert ans.calibrated == caps.calibrated


@pytest.fixture(scope="module")
def grounded():
    from ctlanguage.backends import grounded

    return grounded.load(device="cpu")


@pytest.fixture(scope="module")
def small_volume():
    arr = np.full((24, 40, 40), -1000.0, np.float32)
    arr[3:21, 6:34, 5:35] = 40.0
    arr[6:16, 10:30, 8:18] = -850.0
    return CTVolume(arr, np.diag([8.0, 8.0, 10.0, 1.0]))


def test_embedded_backend_conforms(grounded, small_volume, one_torch_thread):
    check_backend(grounded, small_volume)
    assert isinstance(grounded, ConceptMatcher)
    assert grounded.capabilities.calibrated and "held-out" in grounded.info.calibration


def test_fast_mask_head_equals_the_model_forward(grounded, one_torch_thread):
    """The per-volume path (voxel embedding once, one product per prompt) is the head itself."""
    import torch

    head = grounded.model.mask_head
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(1, grounded.config.dense_channels, 5, 4, 6, generator=g)
    text = torch.nn.functional.normalize(torch.randn(3, grounded.config.embed_dim, generator=g), dim=-1)
    with torch.inference_mode():
        ref = head(dense, text)[0]
        mine = head.logits_from_embedding(head.voxel_embedding(dense[0]), text, dense.shape[2:])
    assert torch.allclose(mine, ref, atol=1e-5)


class LabelAnatomy:
    """A minimal anatomy-only backend: a fixed label map on the source grid (as TotalSegmentator
    returns), to test composition and provenance through the real Engine."""

    class State:
        def __init__(self, labels):
            self.labels = labels

        def tensors(self):
            return {"labels": self.labels}

        def metadata(self):
            return {}

        def nbytes(self):
            return int(self.labels.nbytes)

    def __init__(self, keys):
        self.keys = tuple(keys)
        self.info = ModelInfo(id="label-anatomy", version="1", sha256="0" * 64, kind="test")
        self.capabilities = Capabilities(anatomy=self.keys)

    def encode(self, volume, progress=None, cancel=None, anatomy=None):
        labels = np.zeros(volume.shape, np.uint8)
        labels[6:16, 10:30, 8:18] = 1 + self.keys.index("lung_left")
        return self.State(labels)

    def restore(self, metadata, tensors):
        return self.State(np.asarray(tensors["labels"]))

    def answer(self, state, request):
        mask = np.isin(state.labels, [1 + self.keys.index(k) for k in request.anatomies])
        return Answer(model=self.info.id, mask=mask.astype(np.uint8))


def test_engine_composes_backends_and_labels_every_part(grounded, small_volume, tmp_path,
                                                       one_torch_thread):
    anat = LabelAnatomy(["lung_left", "lung_right"])
    check_backend(anat, small_volume)
    engine = Engine({"anatomy": anat, "masks": grounded, "scores": grounded})
    enc = engine.encode(small_volume)
    assert set(enc.parts) == {"label-anatomy", grounded.info.id}
    lung, effusion = engine.query(enc, "left lung; left pleural effusion")
    assert lung.mask_model == "label-anatomy" and lung.score_model is None
    assert np.array_equal(lung.mask, anat.encode(small_volume).labels == 1)
    assert effusion.mask_model == grounded.info.id == effusion.score_model
    assert effusion.calibrated and effusion.calibration
    assert effusion.to_dict()["score_label"].startswith("probability present")
    # the pipeline has its own identity; its encodings round-trip and refuse other pipelines
    assert engine.model_id == "label-anatomy+" + grounded.info.id
    path = enc.save(tmp_path / "e.safetensors")
    from ctlanguage.engine import Encoding
    from ctlanguage.errors import CheckpointError

    again = Encoding.load(path, engine, volume=small_volume)
    (lung2,) = engine.query(again, "left lung")
    assert np.array_equal(lung2.mask, lung.mask)
    with pytest.raises(CheckpointError):
        Encoding.load(path, Engine.load(grounded))


def test_engine_import_pulls_no_training_or_model_code():
    code = ("import sys, ctlanguage.engine; print(sorted({m.split('.')[0] + '.' + m.split('.')[1] "
            "if m.startswith('ctlanguage.') else m.split('.')[0] for m in sys.modules "
            "if m.startswith(('ctlanguage.training', 'ctlanguage.model', 'torch', 'monai'))}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_test_double_conforms_too(tmp_path, small_volume):
    """The stand-in backend the CLI/glue tests use implements the same contract."""
    import _fake_engine

    check_backend(_fake_engine.FakeBackend(_fake_engine.make_fake_model_dir(tmp_path / "m")),
                  small_volume)


# ---- the same contract in more detail, on the test double and the embedded backend alike ----------
REQUESTS = (
    Request(text="liver", kind="anatomy", anatomies=("liver",)),
    Request(text="liver lesion", kind="finding", anatomies=("liver",), finding="liver_lesion"),
    Request(text="fluid around the left lung", kind="finding", anatomies=("pleural_space_left",),
            finding="pleural_effusion", laterality="left"),
    Request(text="liver lesion", kind="finding", anatomies=("liver",), finding="liver_lesion", want_mask=False),
)


@pytest.fixture(scope="module", params=["fake", "grounded"])
def backend(request, small_volume, tmp_path_factory):
    """(backend module, backend, catalog entry, state on small_volume)."""
    if request.param == "fake":
        import _fake_engine

        b = _fake_engine.FakeBackend(_fake_engine.make_fake_model_dir(tmp_path_factory.mktemp("fake") / "m"))
        return _fake_engine, b, None, b.encode(small_volume)
    from ctlanguage import catalog
    from ctlanguage.backends import grounded as module

    b = request.getfixturevalue("grounded")
    return module, b, catalog.default_entry(), b.encode(small_volume)


def _check_answer(ans, b, req, small_volume):
    assert isinstance(ans, Answer) and ans.model == b.info.id
    assert ans.mask is None or ans.logit is None, "an answer gives logits or a mask, not both"
    if req.want_mask:
        assert ans.mask is not None or ans.logit is not None, f"no mask for {req.text!r}"
    if ans.logit is not None:
        assert isinstance(ans.grid, ModelGrid)
        assert ans.logit.dtype == np.float32 and ans.logit.shape == ans.grid.shape
        assert np.isfinite(ans.logit).all()
    if ans.mask is not None:
        assert ans.mask.dtype == np.uint8 and ans.mask.shape == small_volume.array.shape
        assert set(np.unique(ans.mask)) <= {0, 1}
    assert set(ans.scores) <= set(req.anatomies)
    if req.kind == "finding" and req.want_scores and b.capabilities.scores:
        assert set(ans.scores) == set(req.anatomies)
    for v in ans.scores.values():
        assert np.isfinite(float(v))
        if ans.calibrated:
            assert 0.0 <= float(v) <= 1.0
    assert not ans.calibrated or b.capabilities.calibrated


def test_any_backend_satisfies_the_protocols(backend):
    module, b, entry, state = backend
    assert isinstance(b, Backend)
    assert isinstance(b.info, ModelInfo) and b.info.id and len(b.info.sha256) == 64
    assert isinstance(b.capabilities, Capabilities) and b.capabilities.summary()
    assert all(isinstance(s, str) for s in b.capabilities.summary())
    assert isinstance(state, BackendState) and state.nbytes() > 0
    assert isinstance(b, ConceptMatcher)  # both can place text outside the vocabulary
    phrase, key, _lat, sim = b.nearest_phrase("florbix wuggle")
    assert isinstance(phrase, str) and isinstance(key, str) and np.isfinite(sim)


def test_describe_without_weights_matches_the_loaded_backend(backend):
    module, b, entry, _state = backend
    static = module.describe(entry)
    assert isinstance(static, Capabilities)
    assert static.summary() == b.capabilities.summary()


def test_answers_keep_the_shape_dtype_and_grid_contract(backend, small_volume):
    _module, b, _entry, state = backend
    for req in REQUESTS:
        _check_answer(b.answer(state, req), b, req, small_volume)


def test_state_round_trips_through_json_and_tensors(backend, small_volume):
    import torch

    _module, b, _entry, state = backend
    meta = json.loads(json.dumps(state.metadata()))
    tensors = {k: (torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v.detach().cpu().clone())
               for k, v in state.tensors().items()}
    restored = b.restore(meta, tensors)
    assert isinstance(restored, BackendState)
    for req in REQUESTS[:3]:
        a, r = b.answer(state, req), b.answer(restored, req)
        for name in ("logit", "mask"):
            x, y = getattr(a, name), getattr(r, name)
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
        assert a.scores.keys() == r.scores.keys()
        for k in a.scores:
            assert a.scores[k] == pytest.approx(r.scores[k], abs=1e-6)


def test_through_the_real_engine_findings_are_on_the_source_grid(backend, small_volume, tmp_path):
    _module, b, _entry, _state = backend
    engine = Engine.load(b, device="cpu")
    enc = engine.encode(small_volume)
    findings = engine.query(enc, "liver; liver lesion; fluid around the left lung", mask_threshold=0.5)
    assert [f.prompt for f in findings] == ["liver", "liver lesion", "fluid around the left lung"]
    for f in findings:
        assert isinstance(f, Finding)
        assert f.mask.dtype == np.uint8 and f.mask.shape == small_volume.array.shape
        assert f.mask_model == b.info.id
        assert f.volume_ml == pytest.approx(np.count_nonzero(f.mask) * small_volume.voxel_volume_ml)
        assert f.heatmap().shape == small_volume.array.shape
    assert findings[0].probability is None and findings[0].score_model is None
    assert findings[1].score_model == b.info.id and 0.0 <= findings[1].probability <= 1.0
    assert findings[1].calibrated == b.capabilities.calibrated
    path = enc.save(tmp_path / "enc.safetensors")
    from ctlanguage.engine import Encoding

    again = engine.query(Encoding.load(path, engine, volume=small_volume), "liver lesion")[0]
    assert np.array_equal(again.mask, findings[1].mask)
    assert again.probability == pytest.approx(findings[1].probability, abs=1e-6)

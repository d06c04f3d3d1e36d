"""The backend contract (``ctlanguage.engine.protocol``), checked the same way on the test double
(``Testing/_fake_engine.py``) and on the real embedded backend (``backends/grounded.py`` with
``Resources/Models/ctlanguage-synth-v2``; skipped with the reason when its weights are absent).

Checked: ``isinstance`` with the runtime-checkable Protocols; ``describe(entry)`` (no weights)
says what the loaded backend says; the state saves, survives JSON + tensor round trips and
restores to identical answers; every answer keeps the mask contract (float32 logits exactly the
shape of the ``preprocess.ModelGrid`` it names, or a 0/1 uint8 mask exactly on the source grid),
scores only for the anatomies asked, in [0, 1] when calibrated; through the real Engine the
findings land on the source grid and name the backend that made them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import _fake_engine
from ctlanguage.engine import Engine, Finding
from ctlanguage.engine.protocol import (Answer, Backend, BackendState, Capabilities, ConceptMatcher, ModelInfo,
                                        Request)
from ctlanguage.preprocess import ModelGrid

REQUESTS = (
    Request(text="liver", kind="anatomy", anatomies=("liver",)),
    Request(text="liver lesion", kind="finding", anatomies=("liver",), finding="liver_lesion"),
    Request(text="fluid around the left lung", kind="finding", anatomies=("pleural_space_left",),
            finding="pleural_effusion", laterality="left"),
    Request(text="liver lesion", kind="finding", anatomies=("liver",), finding="liver_lesion", want_mask=False),
)


@pytest.fixture(scope="module")
def volume():
    from ctlanguage.phantom import generate_case
    from ctlanguage.volume import CTVolume

    case = generate_case(11)
    affine = np.asarray(case.ijk_to_ras, dtype=np.float64).copy()
    affine[:3, :3] *= 2  # every second voxel: the same torso, 8x fewer voxels (the model grid is coarser still)
    return CTVolume(array=np.ascontiguousarray(np.asarray(case.volume, dtype=np.float32)[::2, ::2, ::2]),
                    ijk_to_ras=affine, source="phantom seed 11")


def _fake():
    entry = None
    return _fake_engine, _fake_engine.load(entry), entry


def _grounded():
    from ctlanguage import catalog
    from ctlanguage.backends import grounded

    try:
        path, entry = catalog.resolve_model("default")
    except Exception as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"embedded model not available: {exc}")
    return grounded, grounded.load(entry, device="cpu", model_dir=path), entry


@pytest.fixture(scope="module", params=["fake", "grounded"])
def backend(request, volume):
    module, b, entry = _fake() if request.param == "fake" else _grounded()
    return module, b, entry, b.encode(volume)


def _check_answer(ans, b, req, volume):
    assert isinstance(ans, Answer) and ans.model == b.info.id
    assert ans.mask is None or ans.logit is None, "an answer gives logits or a mask, not both"
    if req.want_mask:
        assert ans.mask is not None or ans.logit is not None, f"no mask for {req.text!r}"
    if ans.logit is not None:
        assert isinstance(ans.grid, ModelGrid)
        assert ans.logit.dtype == np.float32 and ans.logit.shape == ans.grid.shape
        assert np.isfinite(ans.logit).all()
    if ans.mask is not None:
        assert ans.mask.dtype == np.uint8 and ans.mask.shape == volume.array.shape
        assert set(np.unique(ans.mask)) <= {0, 1}
    assert set(ans.scores) <= set(req.anatomies)
    if req.kind == "finding" and req.want_scores and b.capabilities.scores:
        assert set(ans.scores) == set(req.anatomies)
    for v in ans.scores.values():
        assert np.isfinite(float(v))
        if ans.calibrated:
            assert 0.0 <= float(v) <= 1.0
    assert not ans.calibrated or b.capabilities.calibrated


def test_backend_satisfies_the_protocols(backend):
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


def test_answers_keep_the_shape_dtype_and_grid_contract(backend, volume):
    _module, b, _entry, state = backend
    for req in REQUESTS:
        _check_answer(b.answer(state, req), b, req, volume)


def test_state_round_trips_through_json_and_tensors(backend, volume):
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


def test_through_the_real_engine_findings_are_on_the_source_grid(backend, volume, tmp_path):
    _module, b, _entry, _state = backend
    engine = Engine.load(b, device="cpu")
    enc = engine.encode(volume)
    findings = engine.query(enc, "liver; liver lesion; fluid around the left lung", mask_threshold=0.5)
    assert [f.prompt for f in findings] == ["liver", "liver lesion", "fluid around the left lung"]
    for f in findings:
        assert isinstance(f, Finding)
        assert f.mask.dtype == np.uint8 and f.mask.shape == volume.array.shape
        assert f.mask_model == b.info.id
        assert f.volume_ml == pytest.approx(np.count_nonzero(f.mask) * volume.voxel_volume_ml)
        assert f.heatmap().shape == volume.array.shape
    assert findings[0].probability is None and findings[0].score_model is None
    assert findings[1].score_model == b.info.id and 0.0 <= findings[1].probability <= 1.0
    assert findings[1].calibrated == b.capabilities.calibrated
    path = enc.save(tmp_path / "enc.safetensors")
    from ctlanguage.engine import Encoding

    again = engine.query(Encoding.load(path, engine, volume=volume), "liver lesion")[0]
    assert np.array_equal(again.mask, findings[1].mask)
    assert again.probability == pytest.approx(findings[1].probability, abs=1e-6)

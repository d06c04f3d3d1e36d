"""fVLM backend logic with a small random network: the stored layout for axis-aligned and oblique
scans (a linear HU field must come out as the field at each output voxel's RAS centre), the
grids that map windows back to the source, the contract (state round trip, scores only for the
anatomies asked, uncalibrated, an encoding file through the Engine), the zero-shot formula by
hand, and the one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

import _fvlm_helpers as H
from ctlanguage.backends.fvlm import preprocess as P
from ctlanguage.engine import Encoding, Engine, Request
from ctlanguage.errors import InputError
from ctlanguage.volume import CTVolume
from test_fvlm_parity import LabelMapAnatomy, _backend

TINY = {"hidden": 32, "layers": 4, "heads": 2, "mlp": 32, "pool_heads": 4}
COEF = np.array([0.7, -1.3, 2.1])


def _field(volume: CTVolume) -> np.ndarray:
    """A linear HU field evaluated at the voxel centres, [k, j, i]."""
    nk, nj, ni = volume.shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ras = volume.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3))
    return (ras @ COEF + 5.0).reshape(volume.shape).astype(np.float32)


@pytest.mark.parametrize("affine", [
    [[0.8, 0, 0, -40], [0, 0.9, 0, 30], [0, 0, 2.5, 10], [0, 0, 0, 1]],           # RAS
    [[0, 0, -1.2, 20], [-0.75, 0, 0, 5], [0, 0.7, 0, -8], [0, 0, 0, 1]],          # permuted, flipped
])
def test_stored_layout_is_an_exact_reordering(affine):
    v = CTVolume(np.zeros((14, 16, 18), np.float32), np.asarray(affine, float))
    v = CTVolume(_field(v), v.ijk_to_ras)
    s = P.to_stored_layout(v)
    d = s.grid.ijk_to_ras[:3, :3] / np.array(s.grid.spacing)
    assert np.allclose(d, P.STORED_DIRECTION)
    assert sorted(s.array.shape) == sorted(v.shape) and s.array.size == v.array.size
    assert np.allclose(s.array, _field(CTVolume(s.array, s.grid.ijk_to_ras)), atol=1e-3)
    assert np.array_equal(s.take(v.array), s.array)


def test_oblique_scans_are_resampled_onto_the_stored_layout():
    c, sn = np.cos(np.radians(12)), np.sin(np.radians(12))
    rot = np.array([[c, -sn, 0], [sn, c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 1.1, 2.0])
    affine[:3, 3] = [-10, 4, 0]
    v = CTVolume(np.zeros((10, 30, 28), np.float32), affine)
    v = CTVolume(_field(v), affine)
    s = P.to_stored_layout(v)
    d = s.grid.ijk_to_ras[:3, :3] / np.array(s.grid.spacing)
    assert np.allclose(d, P.STORED_DIRECTION)
    # within the hull of the source voxel centres, trilinear resampling reproduces a linear field
    out = CTVolume(s.array, s.grid.ijk_to_ras)
    nk, nj, ni = out.shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    src = v.ras_to_ijk_points(out.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3)))
    inside = np.all((src >= -1e-6) & (src <= np.array(v.shape[::-1]) - 1 + 1e-6), axis=1).reshape(out.shape)
    assert inside.mean() > 0.4 and np.allclose(s.array[inside], _field(out)[inside], atol=1e-2)
    assert np.all(s.array[~inside & (s.array > P.AIR_HU)] > -100)   # border: edge values, else air
    mask = np.zeros(v.shape, np.uint8)
    mask[3:7, 10:20, 8:18] = 1
    assert s.take(mask).shape == s.array.shape and 0 < s.take(mask).sum()


def test_resize_and_window_grids_map_back_to_the_source(case_small):
    volume, labels = case_small
    x = P.prepare(volume, H.regions(labels))
    # the label voxels of the prepared input sit on source voxels of the same label
    for organ in x.present():
        w = P.window(x, organ)
        kji = np.argwhere(w.mask)[:: max(1, int(w.mask.sum()) // 200)]
        ras = w.grid.ijk_to_ras[:3, :3] @ kji[:, ::-1].T + w.grid.ijk_to_ras[:3, 3:4]
        src = np.rint(volume.ras_to_ijk_points(ras.T)).astype(int)[:, ::-1]   # [k, j, i]
        src = np.clip(src, 0, np.array(volume.shape) - 1)
        region = H.regions(labels)[organ]
        # nearest resizing shifts by up to one source voxel: allow a one-voxel neighbourhood
        near = np.zeros_like(region)
        for dk in (-1, 0, 1):
            for dj in (-1, 0, 1):
                for di in (-1, 0, 1):
                    near |= np.roll(region, (dk, dj, di), axis=(0, 1, 2))
        assert near[tuple(src.T)].mean() > 0.99, organ


@pytest.fixture(scope="module")
def case_small():
    hu, affine, labels = H.phantom()
    return CTVolume(hu.astype(np.float32), affine), labels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _backend(H.seeded_net(TINY), tmp_path_factory.mktemp("fvlm-tiny"))


def test_contract_round_trip_and_formula(case_small, tiny, tmp_path, one_torch_thread):
    volume, labels = case_small
    engine = Engine({"anatomy": LabelMapAnatomy(lambda v: labels), "masks": tiny, "scores": tiny})
    enc = engine.encode(volume)
    state = enc.parts["fvlm"]
    assert state.nbytes() == 4 * 256 * 4 and set(state.windows) == set(state.organs)
    restored = tiny.restore(state.metadata(), dict(state.tensors()))
    req = Request(text="pleural effusion", kind="finding", anatomies=("pleural_space_left", "pleural_space_right"),
                  finding="pleural_effusion", want_mask=False)
    a, b = tiny.answer(state, req), tiny.answer(restored, req)
    assert a.scores == b.scores and set(a.scores) == set(req.anatomies) and not a.calibrated
    assert a.mask is None and a.logit is None
    # the rule by hand: softmax over ("Not X.", "X.") / temperature
    img = state.embedding("lung")
    neg, pos = tiny.text_embeddings(["Not Pleural effusion.", "Pleural effusion."])
    t = float(tiny.net.temp.detach())
    e = np.exp(np.array([neg @ img, pos @ img]) / t)
    assert a.scores["pleural_space_left"] == pytest.approx(e[1] / e.sum(), abs=1e-6)
    assert tiny.presence(state, "pleural_effusion", "x", None, raw=True) == pytest.approx(
        float((pos - neg) @ img) / t, abs=1e-5)
    # not one of fVLM's findings: no number, and presence says why
    assert tiny.answer(state, Request(text="liver lesion", kind="finding", anatomies=("liver",),
                                      finding="liver_lesion")).scores == {}
    with pytest.raises(InputError, match="gives no score for 'liver_lesion'"):
        tiny.presence(state, "liver_lesion", "liver", None)
    # an encoding file round trip through the Engine gives the same numbers
    enc2 = Encoding.load(enc.save(tmp_path / "enc.safetensors"), engine, volume=volume)
    assert engine.query(enc2, "emphysema")[0].probability == pytest.approx(
        engine.query(enc, "emphysema")[0].probability, abs=1e-7)


def test_absent_region_and_missing_anatomy(case_small, tiny, one_torch_thread):
    volume, labels = case_small
    no_heart = np.where(np.isin(labels, [H.TS["heart"], H.TS["atrial_appendage_left"]]), 0, labels)
    state = tiny.encode_regions(volume, H.regions(no_heart))
    assert "heart" not in state.organs and len(state.organs) == 3
    ans = tiny.answer(state, Request(text="cardiomegaly", kind="finding", anatomies=("heart",),
                                     finding="cardiomegaly"))
    assert ans.scores == {}
    with pytest.raises(InputError, match="heart region"):
        tiny.presence(state, "cardiomegaly", "heart", None)
    with pytest.raises(InputError, match="needs an anatomy backend"):
        tiny.encode(volume)
    with pytest.raises(InputError, match="none of its regions"):
        tiny.encode_regions(volume, {o: np.zeros(volume.shape, bool) for o in P.REGIONS})


def test_uncalibrated_rule_and_site_calibration(case_small, tiny, tmp_path, monkeypatch, one_torch_thread):
    """Uncalibrated: fVLM's own probability with decision point 0.5, a negated prompt gets the
    negated score. A site calibration of these weights (the file `ctlanguage calibrate` writes)
    turns the logit into a probability named after the cohort."""
    import json

    from ctlanguage import calibration as C
    from ctlanguage.backends.fvlm.backend import FVLMBackend
    from ctlanguage.engine.scoring import CALIBRATION_FORMAT, calibrated_probability

    volume, labels = case_small
    monkeypatch.setenv("CTLANGUAGE_CACHE", str(tmp_path / "cache"))
    anat = LabelMapAnatomy(lambda v: labels)
    engine = Engine({"anatomy": anat, "masks": tiny, "scores": tiny})
    enc = engine.encode(volume)
    (f,) = engine.query(enc, "emphysema")
    p = tiny.presence(enc.parts["fvlm"], "emphysema", "x", None)
    assert not f.calibrated and f.probability == pytest.approx(p, abs=1e-7)
    assert f.mask_suppressed == (p < 0.5)
    (g,) = engine.query(enc, "no emphysema")
    assert g.negated and g.probability == pytest.approx(-p, abs=1e-7)
    # calibration asks for raw logits; findings fVLM gives no number for are left out
    raw = C.raw_presence_scores(engine, enc, ["emphysema", "liver_lesion"])
    assert set(raw) == {"emphysema"}
    assert raw["emphysema"] == pytest.approx(tiny.presence(enc.parts["fvlm"], "emphysema", "x", None, raw=True))
    doc = {"format": CALIBRATION_FORMAT, "model_id": tiny.info.id, "model_sha256": tiny.info.sha256,
           "name": "site A", "n": 12, "temperature": 2.0, "offsets": {"emphysema": 0.3, "_default": 0.0},
           "per_finding": {"emphysema": {"temperature": 1.5, "offset": 0.3}}}
    C.write(doc, C.target_file(None, tiny.info.id, tiny.info.sha256))
    site = FVLMBackend(tiny.net, tiny.tokenizer, tiny.info, "cpu")
    assert site.capabilities.calibrated and site.calibration.name == "site A"
    eng2 = Engine({"anatomy": anat, "masks": site, "scores": site})
    enc2 = eng2.encode(volume)
    (h,) = eng2.query(enc2, "emphysema")
    raw = eng2.presence_score(enc2, "emphysema")
    assert h.calibrated and h.calibration == "calibrated on site A, n=12"
    assert h.probability == pytest.approx(calibrated_probability(raw, 1.5, 0.3), abs=1e-6)
    assert json.loads(C.target_file(None, tiny.info.id, tiny.info.sha256).read_text())["name"] == "site A"

"""The Merlin backend's own logic with a randomly initialised network: the engine contract
(encode / answer / restore), the zero-shot rule over our vocabulary's prompt ensembles, laterality,
the heat map on the feature grid, and the text-embedding cache. The network pass uses a
64 x 64 x 32 input (Merlin's is 224 x 224 x 160) to stay cheap; its equality with the
reference is test_merlin_parity.py's job."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import _merlin_helpers as H
from ctlanguage import phrases, vocabulary
from ctlanguage.backends.merlin import backend, text
from ctlanguage.backends.merlin.network import MerlinNet
from ctlanguage.backends.merlin.preprocess import to_merlin_input
from ctlanguage.engine import protocol as P
from test_merlin_preprocess import BASE, SHAPE, volume


@pytest.fixture(scope="module")
def merlin(tmp_path_factory):
    lf = H.tiny_longformer_folder(tmp_path_factory.mktemp("merlin-b") / "clinical-longformer")
    tok = text.load_tokenizer(lf)
    cfg = dict(text.CLINICAL_LONGFORMER) | text.folder_overrides(lf)
    cfg |= {k: H.TINY_TEXT[k] for k in ("intermediate_size", "max_position_embeddings", "type_vocab_size",
                                        "num_hidden_layers")} | {"vocab_size": len(tok)}
    torch.manual_seed(0)
    net = MerlinNet(cfg)
    H.randomise_(net, seed=2)
    return backend.MerlinBackend(net, tok, P.ModelInfo(id="merlin", kind="merlin"), torch.device("cpu"))


@pytest.fixture(scope="module")
def state(merlin):
    small = functools.partial(to_merlin_input, shape_ras=(64, 64, 32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "to_merlin_input", small)
        torch.set_num_threads(1)
        v = volume(SHAPE, BASE)
        v.array[0, 0, 0] = -1024.0
        steps = []
        st = merlin.encode(v, progress=lambda f, msg: steps.append(f))
    assert steps[0] == 0.0 and steps[-1] == 1.0
    return st


def test_encode_gives_a_normalised_embedding_and_feature_grid(merlin, state):
    assert isinstance(merlin, P.Backend) and isinstance(state, P.BackendState)
    assert state.embedding.shape == (512,) and abs(np.linalg.norm(state.embedding) - 1) < 1e-5
    assert state.features.shape == (2048,)
    assert state.feature_map.shape == (2048, 2, 2, 2) and state.feature_grid.shape == (2, 2, 2)
    assert state.grid.shape == (32, 64, 64)
    back = merlin.restore(state.metadata(), state.tensors())
    assert back.grid == state.grid and back.feature_grid == state.feature_grid
    np.testing.assert_array_equal(back.embedding, state.embedding)
    assert state.nbytes() == sum(v.nbytes for v in state.tensors().values())


def test_score_is_mean_positive_minus_mean_negated_similarity(merlin, state):
    pos, neg = phrases.ensemble("pleural_effusion", "left")
    assert len(pos) >= 3 and len(neg) >= 2
    e = state.embedding
    tp, tn = merlin.text_embeddings(list(pos)), merlin.text_embeddings(list(neg))
    np.testing.assert_allclose(np.linalg.norm(tp, axis=1), 1, atol=1e-5)
    want = float(np.mean(tp @ e) - np.mean(tn @ e))
    assert merlin.score(e, "pleural_effusion", "left") == pytest.approx(want, abs=1e-6)
    scores = {f: merlin.score(e, f) for f in ("emphysema", "ascites", "cardiomegaly", "gallstone")}
    assert np.ptp(list(scores.values())) > 1e-4          # findings are told apart
    assert all(-2 <= s <= 2 for s in scores.values())


def test_answer_scores_each_side_with_its_own_prompts_and_is_uncalibrated(merlin, state):
    req = P.Request(text="pleural effusion", kind="finding", finding="pleural_effusion",
                    anatomies=vocabulary.resolve_anatomies("pleural_effusion", "bilateral"),
                    laterality="bilateral")
    ans = merlin.answer(state, req)
    assert ans.model == "merlin" and ans.calibrated is False and ans.mask is None and ans.logit is None
    assert set(ans.scores) == {"pleural_space_left", "pleural_space_right"}
    assert ans.scores["pleural_space_left"] == pytest.approx(merlin.score(state.embedding, "pleural_effusion", "left"))
    assert ans.scores["pleural_space_right"] == pytest.approx(merlin.score(state.embedding, "pleural_effusion", "right"))
    assert ans.scores["pleural_space_left"] != ans.scores["pleural_space_right"]
    emph = merlin.answer(state, P.Request(text="right emphysema", kind="finding", finding="emphysema",
                                          anatomies=("lung_right",), laterality="right"))
    assert emph.scores == {"lung_right": pytest.approx(merlin.score(state.embedding, "emphysema", "right"))}
    # a finding without sides is scored with the same prompts in every anatomy it is judged in
    cm = merlin.answer(state, P.Request(text="cardiomegaly", kind="finding", finding="cardiomegaly",
                                        anatomies=("heart", "pericardium"), laterality="left"))
    assert cm.scores["heart"] == cm.scores["pericardium"] == pytest.approx(
        merlin.score(state.embedding, "cardiomegaly"))
    assert merlin.answer(state, P.Request(text="liver", kind="anatomy", anatomies=("liver",))).scores == {}


def test_heatmap_is_the_rule_per_feature_voxel(merlin, state):
    hm, grid = merlin.heatmap(state, "ascites")
    assert hm.shape == grid.shape == state.feature_grid.shape and np.all(np.isfinite(hm))
    head = merlin.net.image.contrastive_head
    w = head.weight.detach().numpy()[:, :, 0, 0, 0]
    b = head.bias.detach().numpy()
    f = state.feature_map[:, 1, 0, 1]                    # voxel (S 1, A 0, R 1)
    v = w @ f + b
    v /= np.linalg.norm(v)
    pos, neg = merlin.ensemble("ascites", None)
    assert hm[1, 0, 1] == pytest.approx(float((pos.mean(0) - neg.mean(0)) @ v), abs=1e-5)


def test_text_embeddings_are_cached_per_phrase_in_memory_and_on_disk(merlin, tmp_path):
    calls = []
    real = merlin.net.text.forward

    def counting(texts):
        calls.append(list(texts))
        return real(texts)

    cache = tmp_path / "text.npz"
    b1 = backend.MerlinBackend(merlin.net, merlin.net.text.tokenizer, merlin.info, merlin.device,
                               text_cache_file=cache)
    merlin.net.text.forward = counting
    try:
        first = b1.text_embeddings(["new phrase one", "new phrase two"])
        b1.text_embeddings(["new phrase two", "new phrase one", "new phrase three"])
        assert calls == [["new phrase one", "new phrase two"], ["new phrase three"]]
        b2 = backend.MerlinBackend(merlin.net, merlin.net.text.tokenizer, merlin.info, merlin.device,
                                   text_cache_file=cache)     # a later session: read from disk
        again = b2.text_embeddings(["new phrase one", "new phrase two"])
        assert len(calls) == 2
        np.testing.assert_array_equal(again, first)
        cache.write_bytes(b"damaged")                          # a damaged cache is recomputed
        b3 = backend.MerlinBackend(merlin.net, merlin.net.text.tokenizer, merlin.info, merlin.device,
                                   text_cache_file=cache)
        np.testing.assert_allclose(b3.text_embeddings(["new phrase one"]), first[:1], atol=1e-6)
        assert len(calls) == 3
    finally:
        del merlin.net.text.forward


def test_engine_runs_merlin_as_its_scores_backend(merlin, monkeypatch):
    from ctlanguage.engine import Engine

    monkeypatch.setattr(backend, "to_merlin_input", functools.partial(to_merlin_input, shape_ras=(64, 64, 32)))
    eng = Engine.load(merlin, device="cpu")
    v = volume(SHAPE, BASE)
    v.array[0, 0, 0] = -1024.0
    enc = eng.encode(v)
    (f,) = eng.query(enc, "left pleural effusion")
    d = f.to_dict()
    assert d["score_model"] == "merlin" and d["calibrated"] is False and d["calibration"] is None
    assert "uncalibrated" in d["score_label"]
    st = enc.parts["merlin"]
    assert d["anatomy_probabilities"] == {
        "pleural_space_left": pytest.approx(merlin.score(st.embedding, "pleural_effusion", "left"))}


def test_composed_pipeline_names_each_model_and_judges_absence_by_the_zero_shot_rule(merlin, monkeypatch):
    """Masks from one backend, Merlin's scores from another: each number and mask names its model;
    an uncalibrated score judges absence only by Merlin's own rule (score < 0), not by the 0.5
    meant for probabilities, and a negated prompt gets the negated score, not 1 - score."""
    from _fake_engine import FakeBackend
    from ctlanguage.engine import Engine

    monkeypatch.setattr(backend, "to_merlin_input", functools.partial(to_merlin_input, shape_ras=(64, 64, 32)))
    masks = FakeBackend(model_id="mask-model")
    eng = Engine({"anatomy": masks, "masks": masks, "scores": merlin}, device="cpu")
    v = volume(SHAPE, BASE)
    v.array[0, 0, 0] = -1024.0
    enc = eng.encode(v)
    st = enc.parts["merlin"]
    findings = ("pleural_effusion", "liver_lesion", "emphysema", "ascites", "lung_nodule", "cardiomegaly")
    judged = []
    for key in findings:
        phrase = key.replace("_", " ")
        s = max(merlin.score(st.embedding, key, side) for side in
                (("left", "right") if vocabulary.get(key).sided else (None,)))
        (f,) = eng.query(enc, phrase)
        assert f.score_model == "merlin" and f.calibrated is False
        assert f.probability == pytest.approx(s, abs=1e-6)
        assert f.mask_suppressed == (s < 0.0), (key, s)
        assert f.mask.any() == (s >= 0.0)
        if f.mask.any():
            assert f.mask_model == "mask-model"
        (g,) = eng.query(enc, f"no {phrase}")
        assert g.negated and g.probability == pytest.approx(-s, abs=1e-6)
        (h,) = eng.query(enc, phrase, absent_masks=True)
        assert h.mask.any() and not h.mask_suppressed
        judged.append(s < 0.0)
    assert 0 < sum(judged) < len(judged) or pytest.skip("random weights judged all alike")


def test_site_calibration_turns_merlin_scores_into_labelled_probabilities(merlin, monkeypatch, tmp_path):
    """`ctlanguage calibrate` on a scores-only backend: fitted on raw zero-shot scores, stored for
    these weights, and the next load answers calibrated probabilities named after the cohort."""
    import json

    from ctlanguage import calibration as C
    from ctlanguage.engine import Engine
    from ctlanguage.engine.scoring import calibrated_probability
    from ctlanguage.io import write_volume

    monkeypatch.setenv("CTLANGUAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backend, "to_merlin_input", functools.partial(to_merlin_input, shape_ras=(64, 64, 32)))
    rows = []
    for n in range(6):
        v = volume(SHAPE, BASE)
        v.array[...] = v.array * (0.5 + 0.2 * n) + 30.0 * n
        v.array[0, 0, 0] = -1024.0
        write_volume(v, tmp_path / f"c{n}.nii.gz")
        rows.append({"case_id": f"c{n}", "image": f"c{n}.nii.gz", "labels": {"emphysema": n % 2, "ascites": int(n > 2)}})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    eng = Engine.load(merlin, device="cpu")
    doc = C.calibrate(eng, tmp_path / "manifest.jsonl", name="site A")
    assert doc["model_id"] == "merlin" and doc["n"] == 6 and doc["ece_before"] is None
    target = C.target_file(None, merlin.info.id, merlin.info.sha256)
    C.write(doc, target)

    again = backend.MerlinBackend(merlin.net, merlin.net.text.tokenizer, merlin.info, torch.device("cpu"))
    assert again.capabilities.calibrated and again.calibration.name == "site A"
    eng2 = Engine.load(again, device="cpu")
    v = volume(SHAPE, BASE)
    v.array[0, 0, 0] = -1024.0
    enc = eng2.encode(v)
    (f,) = eng2.query(enc, "emphysema")
    raw = eng2.presence_score(enc, "emphysema")
    per = doc["per_finding"]["emphysema"]
    assert f.calibrated and f.calibration == "calibrated on site A, n=6"
    assert f.probability == pytest.approx(calibrated_probability(raw, per["temperature"], per["offset"]), abs=1e-6)
    assert f.score_label.startswith("probability present (calibrated on site A")

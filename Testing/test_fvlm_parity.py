"""fVLM backend vs fVLM's own code: the numbers its code produced (Testing/data/fvlm_parity.json,
made once outside this repository; fVLM has no licence, so none of its code is here) on the
seeded phantom with the seeded weights (Testing/_fvlm_helpers.py), reproduced by our network,
preprocessing and zero-shot rule through the real Engine with an anatomy backend; plus the same
scores for other storage orders of the scan (any orientation lands on the same network input).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import _fvlm_helpers as H
from ctlanguage import vocabulary as V
from ctlanguage.backends.fvlm import backend as B
from ctlanguage.backends.fvlm import preprocess as P
from ctlanguage.engine import Answer, Capabilities, Engine, ModelInfo
from ctlanguage.volume import CTVolume

REF = json.loads((Path(__file__).parent / "data" / "fvlm_parity.json").read_text())
# fVLM's evaluation names of our findings
NAMES = {"emphysema": "Emphysema", "atelectasis": "Atelectasis", "lung_nodule": "Lung nodule",
         "pleural_effusion": "Pleural effusion", "consolidation": "Consolidation",
         "cardiomegaly": "Cardiomegaly", "pericardial_effusion": "Pericardial effusion",
         "arterial_calcification": "Arterial wall calcification"}
TOL = 1e-4


class LabelMapAnatomy:
    """Anatomy backend answering from a TotalSegmentator-style label map on the source grid
    (what the TotalSegmentator backend returns; its real weights cannot exist here)."""

    KEYS = ("lung_left", "lung_right", "heart", "atrial_appendage_left", "esophagus", "aorta")

    class State:
        def __init__(self, labels):
            self.labels = labels

        def tensors(self):
            return {"labels": self.labels}

        def metadata(self):
            return {}

        def nbytes(self):
            return int(self.labels.nbytes)

    def __init__(self, labels_for):
        self.labels_for = labels_for      # volume -> label map on its grid
        self.info = ModelInfo(id="label-map", version="1", sha256="1" * 64, kind="test")
        self.capabilities = Capabilities(anatomy=self.KEYS)

    def encode(self, volume, progress=None, cancel=None, anatomy=None):
        return self.State(self.labels_for(volume))

    def restore(self, metadata, tensors):
        return self.State(np.asarray(tensors["labels"]))

    def answer(self, state, request):
        ids = [H.TS[c] for k in request.anatomies for c in V.components(k)]
        return Answer(model=self.info.id, mask=np.isin(state.labels, ids).astype(np.uint8))


def _backend(net, tmp):
    from ctlanguage.backends.fvlm import weights as W

    tok = W.load_tokenizer(H.write_vocab(tmp / "tok"))
    info = ModelInfo(id="fvlm", version="t", sha256="2" * 64, kind="fvlm")
    return B.FVLMBackend(net, tok, info, "cpu")


@pytest.fixture(scope="module")
def case():
    hu, affine, labels = H.phantom()
    return CTVolume(hu.astype(np.float32), affine), labels


@pytest.fixture(scope="module")
def run(case, tmp_path_factory):
    import torch

    volume, labels = case
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fvlm = _backend(H.seeded_net(), tmp_path_factory.mktemp("fvlm-parity"))
        engine = Engine({"anatomy": LabelMapAnatomy(lambda v: labels), "masks": fvlm, "scores": fvlm})
        yield engine, engine.encode(volume), fvlm
    finally:
        torch.set_num_threads(before)


def test_preprocessing_matches_fvlms_scripts(case):
    volume, labels = case
    x = P.prepare(volume, H.regions(labels))
    ref = REF["processed"]
    assert list(x.image.shape) == ref["shape"]
    assert x.image.astype(np.float64).sum() == pytest.approx(ref["image_sum"], rel=1e-6)
    for organ, w in REF["windows"].items():
        win = P.window(x, organ)
        assert list(win.image.shape) == w["shape"], organ
        assert int(win.mask.sum()) == w["mask_sum"], organ
        assert win.image.astype(np.float64).sum() == pytest.approx(w["image_sum"], rel=1e-6), organ


def test_image_embeddings_equal_the_reference(run):
    _, enc, fvlm = run
    state = enc.parts[fvlm.info.id]
    assert set(state.organs) == set(REF["image_embeddings"])
    for organ, ref in REF["image_embeddings"].items():
        assert np.abs(state.embedding(organ) - np.asarray(ref)).max() <= TOL, organ


def test_tokens_and_text_embeddings_equal_the_reference(run):
    _, _, fvlm = run
    for item in REF["text"].values():
        assert fvlm.tokenizer(item["texts"], padding="longest")["input_ids"] == item["input_ids"]
        assert np.abs(fvlm.text_embeddings(item["texts"]) - np.asarray(item["embeddings"])).max() <= TOL


def test_zero_shot_probabilities_through_the_engine(run):
    engine, enc, fvlm = run
    assert set(NAMES) == set(B.FINDINGS)
    for key, name in NAMES.items():
        assert B.prompt_pair(key)[2] == REF["text"][name]["texts"][0]      # "Not {X}."
        assert B.prompt_pair(key)[1] == REF["text"][name]["texts"][1]      # "{X}."
        assert engine.presence_probability(enc, key) == pytest.approx(REF["probabilities"][name], abs=TOL)
    effusion, heart, liver = engine.query(enc, "left pleural effusion; cardiomegaly; liver lesion")
    assert effusion.score_model == "fvlm" and not effusion.calibrated
    assert effusion.probability_present == pytest.approx(REF["probabilities"]["Pleural effusion"], abs=TOL)
    assert heart.probability == pytest.approx(REF["probabilities"]["Cardiomegaly"], abs=TOL)
    assert liver.probability is None and liver.score_model is None     # not one of fVLM's findings
    assert not effusion.mask.any()                                     # scores only, no masks


def test_any_storage_order_gives_the_same_input_and_scores(case, tmp_path, one_torch_thread):
    """The phantom stored RAS with its axes permuted: the same windows voxel for voxel and the
    same embeddings (a small network keeps this cheap)."""
    volume, labels = case
    perm, flips = (1, 2, 0), (0, 2)              # array axes [k, j, i] -> permuted, then flipped

    def other(a):
        a = np.transpose(a, perm)
        return np.ascontiguousarray(np.flip(a, axis=flips))

    # the same voxels: new index n -> old index; affine = old affine @ (new -> old index map)
    shape_new = other(volume.array).shape
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for new_ax, old_ax in enumerate(perm):           # array axes; voxel axis = 2 - array axis
        sign = -1.0 if new_ax in flips else 1.0
        m[2 - old_ax, 2 - new_ax] = sign
        if sign < 0:
            m[2 - old_ax, 3] = shape_new[new_ax] - 1
    moved = CTVolume(other(volume.array), volume.ijk_to_ras @ m)
    assert np.allclose(moved.ijk_to_ras_points([[0, 0, 0]]), volume.ijk_to_ras_points(
        (m @ [0, 0, 0, 1])[:3][None]))
    a = P.prepare(volume, H.regions(labels))
    b = P.prepare(moved, H.regions(other(labels)))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.grid == b.grid
    net = H.seeded_net({"hidden": 32, "layers": 4, "heads": 2, "mlp": 32, "pool_heads": 4})
    fvlm = _backend(net, tmp_path)
    s1 = fvlm.encode_regions(volume, H.regions(labels))
    s2 = fvlm.encode_regions(moved, H.regions(other(labels)))
    assert np.abs(s1.embeddings - s2.embeddings).max() <= 1e-6
    for key in B.FINDINGS:
        assert fvlm.presence(s1, key, "x", None) == pytest.approx(fvlm.presence(s2, key, "x", None), abs=1e-6)

"""Evaluation harness: metric definitions, label helpers, the `ctlanguage evaluate` command
(single model and comparison table) on a tiny phantom manifest."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctlanguage import evaluation as E


# ------------------------------------------------------------------------------ metrics
def test_auc_known_values():
    assert E.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert E.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert E.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5       # ties count half
    assert E.roc_auc([0, 0, 1], [0.1, 0.4, 0.35]) == 0.5
    assert math.isnan(E.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))          # one class: undefined


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1, allow_nan=False)), min_size=2, max_size=40))
def test_auc_matches_sklearn(rows):
    from sklearn.metrics import roc_auc_score

    y = [int(a) for a, _ in rows]
    s = [round(b, 2) for _, b in rows]   # force ties
    if len(set(y)) < 2:
        assert math.isnan(E.roc_auc(y, s))
    else:
        assert E.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_dice():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 4), bool)
    assert math.isnan(E.dice(a, b))
    a[0, 0, :2] = 1
    b[0, 0, 1:3] = True
    assert E.dice(a, b) == pytest.approx(0.5)
    assert E.dice(a, a) == 1.0
    with pytest.raises(ValueError):
        E.dice(a, np.zeros((4, 4, 5)))


def test_ece_known_values():
    # perfectly calibrated within bins
    p = [0.25] * 4 + [0.75] * 4
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    assert E.expected_calibration_error(p, y) == pytest.approx(0.0)
    # always 0.9 but never positive -> 0.9
    assert E.expected_calibration_error([0.9] * 10, [0] * 10) == pytest.approx(0.9)
    # p = 1.0 lands in the last bin
    assert E.expected_calibration_error([1.0, 1.0], [1, 1]) == pytest.approx(0.0)
    # two bins, weights by count
    assert E.expected_calibration_error([0.05, 0.05, 0.95, 0.95], [0, 1, 1, 1]) == pytest.approx(
        0.5 * abs(0.5 - 0.05) + 0.5 * abs(1 - 0.95))
    rows = E.reliability_table([0.05, 0.95], [0, 1])
    assert len(rows) == 10 and rows[0]["n"] == 1 and rows[-1]["n"] == 1 and rows[5]["n"] == 0


def test_structure_masks_merge_lobes_and_body():
    lab = np.zeros((3, 3, 3), np.int32)
    lab[0, 0, 0] = 1
    lab[0, 0, 1] = 2
    lab[1, 1, 1] = 3
    names = {"1": "lung_upper_lobe_left", "2": "lung_lower_lobe_left", "3": "liver"}
    m = E.structure_masks(lab, names, ["body", "lung_left", "lung_right", "liver", "spleen"])
    assert set(m) == {"body", "lung_left", "liver"}
    assert m["lung_left"].sum() == 2 and m["body"].sum() == 3 and m["liver"].sum() == 1


def test_sided_labels():
    case = {"labels": {"pleural_effusion": 1, "liver_lesion": 0, "kidney_cyst": 1},
            "findings": [{"name": "pleural_effusion", "laterality": "right"},
                         {"name": "kidney_cyst", "laterality": "bilateral"}]}
    assert E.sided_label(case, "pleural_effusion", None) == 1
    assert E.sided_label(case, "pleural_effusion", "right") == 1
    assert E.sided_label(case, "pleural_effusion", "left") == 0
    assert E.sided_label(case, "kidney_cyst", "left") == 1
    assert E.sided_label(case, "liver_lesion", None) == 0
    # present without a side recorded: unknown side
    assert E.sided_label({"labels": {"lung_nodule": 1}, "findings": []}, "lung_nodule", "left") is None


def test_comparison_markdown_has_every_model():
    def fake(auc):
        return {"model": {"id": "m", "presence_source": "organ"}, "data": {"manifest": "x", "n_cases": 3},
                "mean_structure_dice": 0.9, "mean_finding_dice": 0.5, "mean_finding_auc": auc,
                "ece": 0.05, "paraphrases": {"mean_auc": auc - 0.01, "auc_drop": 0.01,
                                             "model_level": {"auc_drop": 0.02}},
                "findings": {"ascites": {"auc": auc}}}

    md = E.comparison_markdown({"grounded": fake(0.95), "global-clip": fake(0.80)})
    assert "| grounded | organ |" in md and "| global-clip | organ |" in md
    assert "0.150" in md  # the AUC gap to the reference model
    assert "| ascites | 0.950 | 0.800 |" in md


# ------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    from ctlanguage.phantom.corpus import write_corpus

    out = tmp_path_factory.mktemp("heldout")
    write_corpus(str(out), 1, seed=9500, montage=False)
    return out / "manifest.jsonl"


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    import torch

    from ctlanguage.model import GroundedCTModel, ModelConfig

    torch.manual_seed(1)
    cfg = ModelConfig(model_id="eval-random", encoder_channels=[8, 16], dense_channels=8,
                      spec_params={"spacing_mm": 6.0})
    d = tmp_path_factory.mktemp("m") / "random"
    GroundedCTModel(cfg).save_pretrained(d)
    return d


def test_evaluate_cli_single_model(tiny_manifest, random_model, tmp_path):
    from ctlanguage.cli import main

    out = tmp_path / "eval"
    rc = main(["--quiet", "evaluate", "--model", str(random_model), "--data", str(tiny_manifest),
               "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("mean_structure_dice", "mean_finding_dice", "mean_finding_auc", "ece",
                "structures", "findings", "paraphrases", "reliability"):
        assert key in m
    assert m["data"]["n_cases"] == 1
    assert "liver" in m["structures"] and 0.0 <= m["structures"]["liver"]["dice"] <= 1.0
    assert set(m["findings"]) <= set(__import__("ctlanguage.vocabulary", fromlist=["x"]).findings())
    assert m["paraphrases"]["n_items_scored"] > 0
    assert "auc_drop" in m["paraphrases"] and "model_level" in m["paraphrases"]
    md = (out / "metrics.md").read_text()
    assert "mean finding AUC" in md and "| liver |" in md


def test_evaluate_cli_compares_models_into_one_table(tiny_manifest, random_model, tmp_path):
    from ctlanguage.cli import main

    out = tmp_path / "cmp"
    doc = tmp_path / "docs" / "model_comparison.md"
    rc = main(["--quiet", "evaluate", "--model", f"first={random_model}",
               "--model", f"second={random_model}", "--data", str(tiny_manifest), "--out", str(out),
               "--doc", str(doc), "--no-paraphrases"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["models"]) == {"first", "second"}
    assert [r["model"] for r in m["comparison"]] == ["first", "second"]
    text = doc.read_text()
    assert "| first |" in text and "| second |" in text


def test_evaluate_cli_bad_manifest_is_a_clean_error(tmp_path, random_model, capsys):
    from ctlanguage.cli import main

    rc = main(["evaluate", "--model", str(random_model), "--data", str(tmp_path / "nope.jsonl"),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_global_clip_baseline_scores_from_the_global_embedding():
    """A model with presence_source="global" (the global-CLIP baseline) is scored from the
    whole-image embedding: the organ embeddings do not matter."""
    import dataclasses

    import torch

    from ctlanguage.engine import Engine
    from ctlanguage.model import GroundedCTModel, ModelConfig
    from ctlanguage.volume import CTVolume

    torch.manual_seed(2)
    cfg = ModelConfig(model_id="global-random", encoder_channels=[8, 16], dense_channels=8,
                      spec_params={"spacing_mm": 6.0}, presence_source="global")
    engine = Engine.load(GroundedCTModel(cfg), device="cpu")
    arr = np.full((30, 48, 48), -1000.0, np.float32)
    arr[4:26, 8:40, 6:42] = 40.0
    enc = engine.encode(CTVolume(arr, np.diag([4.0, 4.0, 5.0, 1.0])))
    (f,) = engine.query(enc, "liver lesion")
    state = enc.part()
    scrambled = dataclasses.replace(enc, parts={
        k: dataclasses.replace(state, organ_embeddings=torch.zeros_like(state.organ_embeddings))
        for k in enc.parts})
    (g,) = engine.query(scrambled, "liver lesion")
    assert f.probability == pytest.approx(g.probability)
    assert engine.roles["scores"].presence_source == "global"

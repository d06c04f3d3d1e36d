"""Evaluation harness: label helpers, the `ctlanguage evaluate` command
(single model and comparison table) on a tiny phantom manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctlanguage import evaluation as E
from ctlanguage import evaluation_report as R


# ------------------------------------------------------------------------------ label helpers
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

    md = R.comparison_markdown({"grounded": fake(0.95), "global-clip": fake(0.80)})
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
    assert 0 <= m["paraphrases"]["n_unanswered"] <= m["paraphrases"]["n_items_scored"]
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


# ------------------------------------------------------------------------------ pictures
def test_evaluate_pictures_show_the_numbers_of_the_tables(tmp_path_factory, random_model):
    """ROC per finding, reliability diagram and Dice per structure: valid PNGs linked from
    metrics.md and embedded in metrics.html, each carrying exactly the numbers of the tables
    (recomputed here with ctlanguage.metrics from the stored probability/label pairs)."""
    from PIL import Image

    from ctlanguage import evaluation_figures as FIG
    from ctlanguage import metrics as M
    from ctlanguage.cli import main
    from ctlanguage.phantom.corpus import write_corpus

    data = tmp_path_factory.mktemp("pictures")
    write_corpus(str(data), 4, seed=9600, spacing=4.0, montage=False)
    out = data / "eval"
    assert main(["--quiet", "evaluate", "--model", str(random_model), "--data", str(data / "manifest.jsonl"),
                 "--out", str(out), "--no-paraphrases"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    md = (out / "metrics.md").read_text()
    html = (out / "metrics.html").read_text()
    shown = {}
    for kind in ("roc", "reliability", "dice"):
        png = out / "figures" / f"{kind}.png"
        assert f"](figures/{kind}.png)" in md
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] >= 400
            shown[kind] = json.loads(im.info[FIG.DATA_KEY])
    assert html.count('src="data:image/png;base64,') == 3 and "<table>" in html

    pairs = m["presence_pairs"]
    assert shown["roc"], "some finding has both classes in 4 phantom cases"
    for f, curve in shown["roc"].items():
        auc = M.roc_auc(pairs[f]["y"], pairs[f]["p"])
        assert curve["auc"] == pytest.approx(auc) == pytest.approx(m["findings"][f]["auc"])
        assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(auc)
        assert f"| {f} | {R.fmt(auc)} |" in md
    all_p = [p for v in pairs.values() for p in v["p"]]
    all_y = [y for v in pairs.values() for y in v["y"]]
    ece = M.expected_calibration_error(all_p, all_y)
    assert shown["reliability"]["ece"] == pytest.approx(ece) == pytest.approx(m["ece"])
    assert shown["reliability"]["bins"] == [r for r in M.reliability_table(all_p, all_y) if r["n"]]
    assert f"| {R.fmt(ece)} |" in md
    assert shown["dice"] == {k: v["dice"] for k, v in m["structures"].items() if v["dice"] is not None}
    for k, d in shown["dice"].items():
        assert f"| {k} | {R.fmt(d)} |" in md


def test_a_scores_model_that_covers_some_findings_is_evaluated_on_those(tiny_manifest):
    """A scores backend with no number for most findings (fVLM scores 8): evaluation measures the
    findings it scores and leaves the others out instead of failing or counting them as 0."""
    import _fake_engine
    from ctlanguage.engine import Engine
    from ctlanguage.engine.protocol import Answer
    from ctlanguage.evaluation import evaluate_model

    covered = {"pleural_effusion", "cardiomegaly", "emphysema"}

    class Partial(_fake_engine.FakeBackend):
        def answer(self, state, request):
            ans = super().answer(state, request)
            if request.finding not in covered:
                ans = Answer(model=ans.model, logit=ans.logit, grid=ans.grid, calibrated=False)
            return ans

    eng = Engine(dict.fromkeys(("anatomy", "masks", "scores"), Partial(model_id="partial")), device="cpu")
    m = evaluate_model(eng, tiny_manifest)
    scored = {k for k, v in m["findings"].items() if v["n_pos"] + v["n_neg"] > 0}
    assert scored and scored <= covered
    assert m["paraphrases"]["n_items_scored"] > 0


def test_size_filter_leaves_small_structures_and_findings_out(tiny_manifest):
    """The issue-14 definitions: Dice over structures >= 5 ml and findings >= 1 ml per case; a
    higher threshold drops exactly the structures below it, and they are counted as skipped."""
    import _fake_engine
    from ctlanguage.engine import Engine
    from ctlanguage.evaluation import evaluate_model, structure_masks
    from ctlanguage.io import read_ct
    from ctlanguage.manifest import read_manifest, read_structures

    eng = Engine(dict.fromkeys(("anatomy", "masks", "scores"), _fake_engine.FakeBackend()), device="cpu")
    case = read_manifest(tiny_manifest)[0]
    vol = read_ct(tiny_manifest.parent / case["image"])
    lab, names = read_structures(case, tiny_manifest.parent, vol.shape)
    ml = {k: float(m.sum()) * vol.voxel_volume_ml for k, m in structure_masks(lab, names, eng.anatomies).items()}
    cut = sorted(ml.values())[len(ml) // 2]          # about half the structures are smaller
    m_all = evaluate_model(eng, tiny_manifest, paraphrases=[], min_structure_ml=0.0, min_finding_ml=0.0)
    m_cut = evaluate_model(eng, tiny_manifest, paraphrases=[], min_structure_ml=cut, min_finding_ml=1e6)
    assert set(m_all["structures"]) == set(ml)
    assert set(m_cut["structures"]) == {k for k, v in ml.items() if v >= cut}
    assert m_cut["size_filter"]["skipped"]["structures"] == sum(v < cut for v in ml.values())
    assert m_cut["findings"] and all(v["n_dice"] == 0 for v in m_cut["findings"].values())
    assert m_cut["size_filter"]["skipped"]["findings"] >= 1
    for name, row in m_cut["findings"].items():   # presence is not filtered
        assert row["n_pos"] + row["n_neg"] == m_all["findings"][name]["n_pos"] + m_all["findings"][name]["n_neg"]


def test_paraphrases_without_an_answer_are_counted(tiny_manifest):
    import _fake_engine
    from ctlanguage.engine import Engine
    from ctlanguage.evaluation import evaluate_model

    eng = Engine(dict.fromkeys(("anatomy", "masks", "scores"), _fake_engine.FakeBackend()), device="cpu")
    items = [{"key": "pleural_effusion", "laterality": None, "text": "fluid around the lungs", "kind": "finding"},
             {"key": "pleural_effusion", "laterality": None, "text": "zqxv blorp", "kind": "finding"}]
    m = evaluate_model(eng, tiny_manifest, paraphrases=items)
    assert m["paraphrases"]["n_items_scored"] == 2 and m["paraphrases"]["n_unanswered"] == 1

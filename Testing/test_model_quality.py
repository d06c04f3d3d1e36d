"""Quality floors of the embedded default model on held-out phantoms generated at test time.

The phantoms use seeds 9000-9007: the training corpus uses seeds 1000+ (train), 5000+
(calibration) and the validation split, so none of these cases was seen in training or
calibration. Every number goes through the real engine path (``ctlanguage.evaluation``:
read_ct -> Engine.encode -> Engine.query; Dice on the source grid).

The floors sit a little below what the default model measured on exactly this set (see
docs/evaluation.md); a drop below them is a regression of the model, the engine or the
preprocessing, not noise: the phantoms, the model and the engine are deterministic.
"""

from __future__ import annotations

import math

import pytest

from ctlanguage.engine import resolve_model_dir

from _model_state import default_model_state

N_CASES = 8
FIRST_SEED = 9000

# Measured with ctlanguage-synth-v3 (weights sha256 796c89e488ab…, see its model card) on seeds
# 9000-9007, then lowered by a margin. The model is far below the product targets (structure
# Dice >= 0.85, finding AUC >= 0.90): these floors catch regressions of the model, the engine path
# and the geometry; they do not certify quality.
#   measured: mean structure Dice 0.640, liver 0.859, body 0.993, lungs 0.952 / 0.951,
#             mean finding Dice 0.305, mean finding AUC 0.647, ECE 0.046,
#             paraphrase parser accuracy 1.000, paraphrase AUC drop 0.000, none unanswered
# (v2 measured AUC 0.785 on these 8 cases but 0.700 on all 24 of the set, where v3 measures 0.724;
# with 1-3 positives per finding in 8 cases the AUC floor is a regression guard, not a ranking.)
FLOORS = {
    "mean_structure_dice": 0.60,
    "liver_dice": 0.80,
    "body_dice": 0.95,
    "lung_dice": 0.90,
    "mean_finding_dice": 0.26,
    "mean_finding_auc": 0.60,
    "ece_max": 0.06,
    "paraphrase_parser_accuracy": 0.90,
    "paraphrase_auc_drop_max": 0.04,
}


STATE = default_model_state()
pytestmark = pytest.mark.skipif(STATE != "trained", reason=f"embedded default model is {STATE}")


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    from ctlanguage.engine import Engine
    from ctlanguage.evaluation import evaluate_model
    from ctlanguage.phantom.corpus import write_corpus

    out = tmp_path_factory.mktemp("heldout")
    write_corpus(str(out), N_CASES, seed=FIRST_SEED, montage=False)
    engine = Engine.load("default", device="cpu")
    return evaluate_model(engine, out / "manifest.jsonl")


def test_held_out_seeds_are_not_in_the_training_corpora():
    """The corpora the default model was trained, calibrated and monitored on (listed in its
    config.json, checked when present on this machine) never use the held-out seeds."""
    import json
    from pathlib import Path

    cfg = json.loads((resolve_model_dir("default") / "config.json").read_text())
    training = cfg.get("training") or {}
    # a stage-2 model lists its own corpora and those of its stage-1 encoder; a split is one
    # corpus spec or a list of them
    specs = [(split, spec) for t in (training, training.get("stage1_training") or {})
             for split, v in ((t.get("data") or {}).items())
             for spec in (v if isinstance(v, list) else [v]) if isinstance(spec, dict)]
    root = Path(__file__).resolve().parents[1]
    wanted = set(range(FIRST_SEED, FIRST_SEED + N_CASES)) | set(range(REALISTIC_SEED, REALISTIC_SEED + REALISTIC_CASES))
    checked = 0
    for split, spec in specs:
        ph = spec.get("phantom") or {}
        if "seed" in ph and "n" in ph:   # phantom corpora are seeds seed .. seed+n-1
            assert not wanted & set(range(int(ph["seed"]), int(ph["seed"]) + int(ph["n"]))), split
            checked += 1
        m = root / spec.get("manifest", "")
        if spec.get("manifest") and m.is_file():
            seeds = {int(json.loads(l)["seed"]) for l in m.read_text().splitlines() if l.strip()}
            assert not wanted & seeds, split
    if not checked:
        pytest.skip("the model's config.json does not list its training corpora")


def test_organ_dice_floor(metrics):
    s = metrics["structures"]
    assert metrics["mean_structure_dice"] >= FLOORS["mean_structure_dice"], s
    assert s["liver"]["dice"] >= FLOORS["liver_dice"]
    assert s["body"]["dice"] >= FLOORS["body_dice"]
    assert s["lung_left"]["dice"] >= FLOORS["lung_dice"]
    assert s["lung_right"]["dice"] >= FLOORS["lung_dice"]


def test_finding_dice_floor(metrics):
    assert metrics["mean_finding_dice"] >= FLOORS["mean_finding_dice"], metrics["findings"]


def test_finding_auc_floor(metrics):
    assert metrics["mean_finding_auc"] >= FLOORS["mean_finding_auc"], metrics["findings"]


def test_calibration_floor(metrics):
    assert metrics["ece"] is not None and not math.isnan(metrics["ece"])
    assert metrics["ece"] <= FLOORS["ece_max"], metrics["reliability"]


def test_paraphrases_are_understood(metrics):
    para = metrics["paraphrases"]
    assert para["n_items_scored"] > 0
    assert para["parser_accuracy"] >= FLOORS["paraphrase_parser_accuracy"]
    assert para["auc_drop"] is not None
    assert para["auc_drop"] <= FLOORS["paraphrase_auc_drop_max"]
    assert para["n_unanswered"] == 0   # every everyday phrasing gets a number (fallback included)


# ---- the issue-14 set: "realistic variation" phantoms (field of view incl. chest-only and
# 20-60-slice abdominal slabs, contrast phase, noise, kernel, 0.6-5 mm slices), seeds 30000+
# (held out: the embedded model trained on 20000+ realistic and 41000+ full-variation phantoms)
REALISTIC_SEED, REALISTIC_CASES = 30000, 8
# measured with ctlanguage-synth-v3 on seeds 30000-30007: structure Dice 0.637, finding Dice 0.356,
# AUC 0.723, liver 0.801, lungs 0.932 / 0.940, heart 0.862
FLOORS_REALISTIC = {"mean_structure_dice": 0.60, "mean_finding_dice": 0.30, "mean_finding_auc": 0.66,
                    "liver_dice": 0.75, "lung_left_dice": 0.88, "lung_right_dice": 0.88, "heart_dice": 0.80}


@pytest.fixture(scope="module")
def metrics_realistic(tmp_path_factory):
    from ctlanguage.engine import Engine
    from ctlanguage.evaluation import evaluate_model
    from ctlanguage.phantom.corpus import write_corpus

    out = tmp_path_factory.mktemp("heldout-realistic")
    write_corpus(str(out), REALISTIC_CASES, seed=REALISTIC_SEED, montage=False, variation="realistic")
    return evaluate_model(Engine.load("default", device="cpu"), out / "manifest.jsonl", paraphrases=[])


def test_realistic_variation_floors(metrics_realistic):
    m, f = metrics_realistic, FLOORS_REALISTIC
    assert m["mean_structure_dice"] >= f["mean_structure_dice"], m["structures"]
    assert m["mean_finding_dice"] >= f["mean_finding_dice"], m["findings"]
    assert m["mean_finding_auc"] >= f["mean_finding_auc"], m["findings"]
    for key in ("liver", "lung_left", "lung_right", "heart"):
        assert m["structures"][key]["dice"] >= f[f"{key}_dice"], (key, m["structures"][key])

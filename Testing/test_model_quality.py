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

N_CASES = 8
FIRST_SEED = 9000

# measured with ctlanguage-synth-v1 on seeds 9000-9007 (docs/evaluation.md), then lowered a bit
FLOORS = {
    "mean_structure_dice": 0.80,
    "liver_dice": 0.85,
    "mean_finding_auc": 0.80,
    "ece_max": 0.20,
    "paraphrase_parser_accuracy": 0.80,
}


def _default_model_state() -> str:
    """'trained' (calibrated final model), 'preliminary' (integration checkpoint) or 'missing'."""
    import json

    try:
        d = resolve_model_dir("default")
        cfg = json.loads((d / "config.json").read_text())
    except Exception:
        return "missing"
    if not (d / "model.safetensors").is_file():
        return "missing"
    if not cfg.get("calibration") or "preliminary" in json.dumps(cfg.get("metrics", {})).lower():
        return "preliminary"
    return "trained"


STATE = _default_model_state()
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
    """The training/calibration/validation corpora (work-data/synth/*, when present here) never
    use the seeds of this held-out set."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "work-data" / "synth"
    manifests = sorted(root.glob("*/manifest.jsonl"))
    if not manifests:
        pytest.skip("training corpora not present on this machine")
    used = set()
    for m in manifests:
        for line in m.read_text().splitlines():
            if line.strip():
                used.add(int(json.loads(line)["seed"]))
    assert not used & set(range(FIRST_SEED, FIRST_SEED + N_CASES))


def test_organ_dice_floor(metrics):
    assert metrics["mean_structure_dice"] >= FLOORS["mean_structure_dice"], metrics["structures"]
    assert metrics["structures"]["liver"]["dice"] >= FLOORS["liver_dice"]


def test_finding_auc_floor(metrics):
    assert metrics["mean_finding_auc"] >= FLOORS["mean_finding_auc"], metrics["findings"]


def test_calibration_floor(metrics):
    assert metrics["ece"] is not None and not math.isnan(metrics["ece"])
    assert metrics["ece"] <= FLOORS["ece_max"], metrics["reliability"]


def test_paraphrases_are_understood(metrics):
    para = metrics["paraphrases"]
    assert para["n_items_scored"] > 0
    assert para["parser_accuracy"] >= FLOORS["paraphrase_parser_accuracy"]

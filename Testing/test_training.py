"""Training pipeline: losses, tiny end-to-end run with resume + calibration, DDP with 2 CPU ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_corpus import make_tiny_corpus  # noqa: E402

from ctlanguage.model import GroundedCTModel  # noqa: E402
from ctlanguage.training import losses as L  # noqa: E402
from ctlanguage.training import phrases as PH  # noqa: E402
from ctlanguage.metrics import expected_calibration_error  # noqa: E402
from ctlanguage.training.train import fit_temperature, run_training  # noqa: E402

TINY_MODEL = {"spec_params": {"spacing_mm": 5.0}, "encoder_channels": [8, 16], "dense_channels": 8,
              "embed_dim": 16, "pool_dim": 8, "mask_head_hidden": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("tiny"), n=4)



pytestmark = pytest.mark.usefixtures("one_torch_thread")  # Testing/conftest.py


def tiny_cfg(corpus, out, steps=4, **losses):
    return {"model": dict(TINY_MODEL),
            "data": {"train": {"manifest": str(corpus)}, "val": {"manifest": str(corpus)},
                     "calib": {"manifest": str(corpus)}},
            "train": {"steps": steps, "batch_size": 2, "eval_every": 0, "checkpoint_every": 2,
                      "log_every": 1, "seed": 3},
            "losses": {"consistency": 0.2, "global_clip": 0.1, **losses},
            "output": str(out), "export": str(out) + "_export"}


def test_fn_calibration_targets():
    T = L.soft_target_matrix(["a", "n", "a", "n"], [False, True, False, True], ["x", "x", "x", "x"], True)
    assert T[0, 2] == 1 and T[1, 3] == 1 and T[0, 1] == 0
    T0 = L.soft_target_matrix(["a", "n", "a", "n"], [False, True, False, True], ["x"] * 4, False)
    assert torch.equal(T0, torch.eye(4))


def test_fn_calibration_acts_only_on_differently_worded_positives():
    """Identical texts share their loss anyway (same embedding, same logits), so calibrating them
    changes nothing; two normal sentences of one organ in different words are where it acts."""
    import numpy as np

    from ctlanguage.training import phrases as PH

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    normal, anat = [True, False, True, False], ["liver", "liver", "liver", "lung"]

    def losses(texts):
        emb = {t: torch.nn.functional.normalize(torch.randn(8, generator=torch.Generator().manual_seed(len(t))), dim=-1)
               for t in texts}
        txt = torch.stack([emb[t] for t in texts])
        return [float(L.organ_contrastive_loss(img, txt, torch.tensor(10.0), texts, normal, anat, fn_calibration=fn))
                for fn in (True, False)]

    same = losses(["liver shows no significant abnormalities", "liver lesion",
                   "liver shows no significant abnormalities", "lung nodule"])
    assert abs(same[0] - same[1]) < 1e-6
    varied = losses(["liver shows no significant abnormalities", "liver lesion", "normal liver", "lung nodule"])
    assert abs(varied[0] - varied[1]) > 1e-3
    rng = np.random.default_rng(0)
    assert len({PH.normal_sentence("liver", rng) for _ in range(40)}) == len(PH.NORMAL_TEMPLATES)
    assert PH.normal_sentence("liver") == "liver shows no significant abnormalities"   # v1-v3 wording


def test_losses_behave():
    t = torch.zeros(1, 2, 4, 4, 4)
    t[0, 0, :2] = 1
    good = torch.where(t > 0, 20.0, -20.0)
    assert L.seg_loss(good, t) < 0.01 < L.seg_loss(-good, t)
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    l_same = L.organ_contrastive_loss(e, e, torch.tensor(10.0), list("abcd"), [False] * 4, list("wxyz"))
    l_rand = L.organ_contrastive_loss(e, e.flip(0), torch.tensor(10.0), list("abcd"), [False] * 4, list("wxyz"))
    assert l_same < l_rand
    extra = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    valid = torch.zeros(4, 3, dtype=torch.bool)  # all extras masked -> finite
    assert torch.isfinite(L.organ_contrastive_loss(e, e, torch.tensor(10.0), list("abcd"), [True] * 4,
                                                   list("wxyz"), True, extra, valid))
    assert L.consistency_loss(e, e, e, e).abs() < 1e-5


def test_heldout_phrases_never_trained():
    held = PH.heldout_phrases()
    assert held, "data/paraphrases_heldout.json should exist"
    for f, s, _ in PH.finding_items():
        assert not held & {p.lower() for p in PH.phrases_for(f, s)}
        pos, neg = PH.ensemble_for(f, s)
        assert not held & {p.lower() for p in pos + neg}


def test_temperature_and_ece():
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.3
    z = np.where(y, 2.0, -2.0) + rng.normal(0, 1.5, 2000)
    T = fit_temperature(3 * z, y)
    assert 1.4 < T < 2.0  # true log-odds slope here is 4/1.5**2 = 1.78 -> T = 3/1.78
    assert expected_calibration_error(1 / (1 + np.exp(-3 * z / T)), y) < expected_calibration_error(
        1 / (1 + np.exp(-3 * z)), y)


def test_train_resume_calibrate_export(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(corpus, out, steps=2)
    run_training(cfg, quiet=True)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    cfg["train"]["steps"] = 4
    # a later phase switches the segmentation loss off from step 4 (0-based 3) on
    cfg["phases"] = [{"from_step": 3, "losses": {"seg": 0.0, "presence_pos_weight": 3.0,
                                                      "pool_predicted_masks": 1.0}}]
    run_training(cfg, quiet=True)           # resumes at step 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    by_step = {r["step"]: r for r in lines if "loss" in r}
    # no seg part at step 4: its running average stays where step 3 left it, the others move
    assert by_step[4]["seg"] == by_step[3]["seg"] and by_step[4]["presence"] != by_step[3]["presence"]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    m = GroundedCTModel.from_pretrained(str(out) + "_export", device="cpu")
    assert m.config.calibration["n_cases"] == 4
    assert m.config.calibration_temperature > 0
    assert m.config.training["steps"] == 4
    assert m.config.training["phases"][0]["from_step"] == 3


def test_deterministic_first_step(corpus, tmp_path):
    losses = []
    for k in range(2):
        out = tmp_path / f"d{k}"
        cfg = tiny_cfg(corpus, out, steps=1)
        cfg.pop("export")
        run_training(cfg, quiet=True, resume=False)
        losses.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_ddp_two_cpu_processes(corpus, tmp_path):
    out = tmp_path / "ddp"
    cfg = tiny_cfg(corpus, out, steps=2)
    cfg.pop("export")
    cfg["data"].pop("calib")
    cfg["train"]["device"] = "cpu"
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000), "-m", "ctlanguage.cli",
                        "-q", "train", "--config", str(cfg_path)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    GroundedCTModel.from_pretrained(out / "final", device="cpu")


def test_bootstrap_auc_difference_separates_a_better_model_from_noise():
    import numpy as np

    from ctlanguage.training.report import bootstrap_auc_difference, mean_auc

    rng = np.random.default_rng(0)
    y = (rng.random((60, 5)) < 0.3).astype(float)
    good = {"z": y + rng.normal(0, 0.3, y.shape), "y": y}
    noise = {"z": rng.normal(0, 1, y.shape), "y": y}
    assert mean_auc(good["z"], y) > 0.9 and 0.3 < mean_auc(noise["z"], y) < 0.7
    d, lo, hi = bootstrap_auc_difference(good, noise, n=200)
    assert d > 0.2 and 0 < lo <= d <= hi
    d, lo, hi = bootstrap_auc_difference(noise, noise, n=200)
    assert d == 0 and lo == 0 and hi == 0
    other = {"z": noise["z"], "y": 1 - y}
    with pytest.raises(ValueError, match="same cases"):
        bootstrap_auc_difference(good, other, n=10)

"""Stage 2 (training/stage2.py, training/features.py): cached features equal the live encoder's,
training touches only the language side and resumes, the "body" global baseline scores from the
whole-body embedding, and the result is an ordinary calibrated model folder."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_corpus import make_tiny_corpus  # noqa: E402
from test_seg_head import CLASSES, TINY  # noqa: E402  (the same tiny seg-head model)

from ctlanguage.model import GroundedCTModel, ModelConfig  # noqa: E402
from ctlanguage.training.dataset import ManifestDataset  # noqa: E402
from ctlanguage.training.features import FeatureSet, cache_features, collate_features  # noqa: E402
from ctlanguage.training.train import collect_predictions, run_training  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # Testing/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    train = make_tiny_corpus(root / "train", n=4, shape=(48, 32, 40))
    calib = make_tiny_corpus(root / "calib", n=4, seed=10, shape=(48, 32, 40))
    torch.manual_seed(0)
    model = GroundedCTModel(ModelConfig(**TINY))
    stage1 = model.save_pretrained(root / "stage1")
    return root, train, calib, stage1


def _state(model, prefix):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_cached_features_reproduce_the_live_encoder(setup, tmp_path):
    root, train, _, stage1 = setup
    model = GroundedCTModel.from_pretrained(stage1, device="cpu").eval()
    cache_features(model, train, tmp_path / "f")
    fs = FeatureSet(tmp_path / "f")
    ds = ManifestDataset(train, model.config.spec, model.config.anatomies, feature_stride=2)
    assert len(fs) == len(ds) == 4
    for i in range(len(ds)):
        live, cached = ds.sample(i), fs.sample(i)
        with torch.no_grad():
            dense = model.encode_image(live["image"][None]).dense[0]
        assert cached["dense"].shape == dense.shape
        assert torch.allclose(cached["dense"], dense, atol=2e-3 * float(dense.abs().max()) + 1e-4)
        for k in ("anat_full", "find_full", "find_known", "presence"):
            assert torch.equal(cached[k], live[k].to(cached[k].dtype)), k
        for k in ("anat", "find"):
            assert torch.allclose(cached[k], live[k], atol=1 / 255), k
    # the predictions the comparison and calibration use: same from cache as from images
    a, b = collect_predictions(model, fs), collect_predictions(model, ds)
    assert np.allclose(a["logits"], b["logits"], atol=0.05)
    assert np.array_equal(a["labels"], b["labels"])
    # a second call re-encodes nothing (resumable): the files are not rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "f").glob("*.npz")}
    cache_features(model, train, tmp_path / "f")
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "f").glob("*.npz")}
    lean = FeatureSet(tmp_path / "f", full=False, seg=False)   # what training keeps in memory
    for i in range(len(fs)):
        a, b = fs.sample(i), lean.sample(i)
        assert set(a) - set(b) == {"anat_full", "find_full", "seg"}
        for k in b:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k
    batch = collate_features([fs.sample(0), fs.sample(1)])
    assert batch["dense"].shape[0] == 2 and batch["anat"].shape[2:] == batch["dense"].shape[2:]


def _config(root, train, calib, stage1, out, steps, **extra):
    return {"stage": 2, "stage1": str(stage1), "features": str(root / "features"),
            "data": {"train": [str(train)], "calib": str(calib)},
            "train": {"steps": steps, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1,
                      "checkpoint_every": 2, "log_every": 1},
            "losses": {"presence_pos_weight": 2.0}, "output": str(out), **extra}


def test_stage2_trains_only_the_language_side_and_resumes(setup, tmp_path):
    root, train, calib, stage1 = setup
    before = GroundedCTModel.from_pretrained(stage1, device="cpu")
    final = run_training(_config(root, train, calib, stage1, tmp_path / "run", 2), quiet=True)
    after = GroundedCTModel.from_pretrained(final, device="cpu")
    for prefix in ("image_encoder.", "seg_head."):
        for k, v in _state(before, prefix).items():
            assert torch.equal(v, after.state_dict()[k]), k
    changed = [k for k, v in _state(before, "organ_pool.").items() if not torch.equal(v, after.state_dict()[k])]
    assert changed, "stage 2 did not train the organ pooling"
    cal = after.config.calibration
    assert cal["n_cases"] == 4 and "cached stage-1 features" in cal["method"]
    assert after.config.training["stage"] == 2 and after.config.training["steps"] == 2
    assert after.config.training["stage1_training"] == before.config.training   # provenance kept
    # resume: a longer schedule continues from the saved step instead of starting over
    log = tmp_path / "run" / "metrics.jsonl"
    n_before = len(log.read_text().splitlines())
    run_training(_config(root, train, calib, stage1, tmp_path / "run", 3), quiet=True)
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps[n_before:] == [3]


def test_body_baseline_scores_from_the_whole_body_embedding(setup, tmp_path):
    root, train, calib, stage1 = setup
    cfg = _config(root, train, calib, stage1, tmp_path / "g", 2, model={"presence_source": "body"},
                  losses={"organ_contrastive": 0.0, "global_clip": 1.0})
    cfg["train"]["voxels_per_case"] = 200          # trained on voxel samples, evaluated on the grid
    final = run_training(cfg, quiet=True)
    m = GroundedCTModel.from_pretrained(final, device="cpu")
    assert m.config.presence_source == "body"
    fs = FeatureSet(next((root / "features").glob("*/calib-*")))
    fs.check_encoder(m)                 # stage 2 kept the encoder the features came from
    pred = collect_predictions(m, fs)
    # every finding of a case is judged from the same (body) embedding: liver and lung findings
    # differ only by their text, so permuting the organ queries changes nothing
    with torch.no_grad():
        q = m.organ_pool.query.clone()
        body = m.anatomy_index("body")
        perm = torch.randperm(q.shape[0])
        perm = perm[perm != body]
        idx = [i for i in range(q.shape[0]) if i != body]
        m.organ_pool.query[idx] = q[perm]
    assert np.allclose(collect_predictions(m, fs)["logits"], pred["logits"], atol=1e-5)
    with torch.no_grad():                # another encoder: its features are refused
        next(m.image_encoder.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="another image encoder"):
        fs.check_encoder(m)


def test_a_new_3x3x3_seg_head_learns_on_cached_class_fractions(setup, tmp_path):
    root, train, calib, stage1 = setup
    cfg = _config(root, train, calib, stage1, tmp_path / "s", 2, train_seg_head=True,
                  model={"seg_head_kernel": 3, "seg_head_hidden": 6},
                  losses={"seg_head": 1.0, "finding_seg": 1.0})
    final = run_training(cfg, quiet=True)
    m = GroundedCTModel.from_pretrained(final, device="cpu")
    assert m.config.seg_head_kernel == 3 and m.seg_head.trunk[0].kernel_size == (3, 3, 3)
    before = GroundedCTModel.from_pretrained(stage1, device="cpu")
    for k, v in _state(before, "image_encoder.").items():
        assert torch.equal(v, m.state_dict()[k]), k
    fs = FeatureSet(next((root / "features").glob("*/train-*")))
    s = fs.sample(0)
    assert s["seg"].shape[0] == len(CLASSES) + 1
    assert torch.allclose(s["seg"].sum(0)[s["anat"][0] > 0], torch.tensor(1.0), atol=0.05)
    with pytest.raises(ValueError, match="train_seg_head"):
        run_training(_config(root, train, calib, stage1, tmp_path / "t", 1,
                             model={"seg_head_kernel": 3}), quiet=True)


def test_voxel_subsample_keeps_every_mask_and_the_pairing(setup, tmp_path):
    from ctlanguage.training.features import subsample_voxels

    root, train, _, stage1 = setup
    model = GroundedCTModel.from_pretrained(stage1, device="cpu").eval()
    cache_features(model, train, tmp_path / "f")
    s = FeatureSet(tmp_path / "f", full=False).sample(0)
    sub = subsample_voxels(s, 300, np.random.default_rng(0), per_mask=20)
    assert sub["dense"].shape == (s["dense"].shape[0], 300, 1, 1) and sub["anat"].shape[1:] == (300, 1, 1)
    for k in ("anat", "find"):
        full = s[k].flatten(1)
        for ch in range(full.shape[0]):
            n_in = int((full[ch] > 0).sum())
            assert int((sub[k][ch] > 0).sum()) >= min(20, n_in), (k, ch)
    # each kept voxel carries its own features and targets (same column of every tensor)
    dense, anat = s["dense"].flatten(1), s["anat"].flatten(1)
    for j in range(0, 300, 37):
        col = (dense == sub["dense"][:, j, 0, 0][:, None]).all(0).nonzero().flatten()
        assert any(torch.equal(anat[:, c], sub["anat"][:, j, 0, 0]) for c in col)

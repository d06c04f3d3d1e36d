"""Stage-1 segmentation head (model/seg_head.py): class -> anatomy rule, loss, training with slab
crops, in-plane coordinates, and the engine taking anatomy / finding masks from it."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_corpus import LABELS, make_tiny_corpus  # noqa: E402
from test_backend_contract import check_backend  # noqa: E402

from ctlanguage.engine.protocol import Request  # noqa: E402
from ctlanguage.model import GroundedCTModel, ModelConfig  # noqa: E402
from ctlanguage.model.image_encoder import coordinate_channels  # noqa: E402
from ctlanguage.model.seg_head import anatomy_logits, members  # noqa: E402
from ctlanguage.phrases import canonical_phrase  # noqa: E402
from ctlanguage.training import losses as L  # noqa: E402
from ctlanguage.training.dataset import ManifestDataset  # noqa: E402
from ctlanguage.training.train import run_training  # noqa: E402
from ctlanguage.volume import CTVolume  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # Testing/conftest.py

CLASSES = sorted(set(LABELS.values()))
TINY = {"spec_params": {"spacing_mm": 5.0}, "encoder_channels": [8, 16], "dense_channels": 8,
        "embed_dim": 16, "pool_dim": 8, "mask_head_hidden": 4, "coord_mode": "inplane",
        "seg_classes": CLASSES, "seg_findings": [["liver_lesion", None]]}


def test_members_follow_the_label_map_rule():
    assert members("lung_left", CLASSES) == [CLASSES.index("lung_lower_lobe_left") + 1,
                                             CLASSES.index("lung_upper_lobe_left") + 1]
    assert members("body", CLASSES) == list(range(1, len(CLASSES) + 1))
    assert members("liver", CLASSES) == [CLASSES.index("liver") + 1]
    assert members("spleen", CLASSES) == []


def test_anatomy_logits_sum_class_probabilities():
    K = len(CLASSES)
    cl = torch.full((K + 1, 2, 1, 1), -10.0)
    cl[CLASSES.index("lung_upper_lobe_left") + 1, 0] = 10.0   # voxel 0: a left upper lobe
    cl[0, 1] = 10.0                                             # voxel 1: background
    lg, has = anatomy_logits(cl, ["lung_left", "liver", "body", "spleen"], CLASSES)
    assert has == [True, True, True, False]
    assert lg[0, 0] > 5 and lg[1, 0] < -5 and lg[2, 0] > 5     # lung and body yes, liver no
    assert (lg[:, 1] < 0).all()                                 # background: nothing


def test_multiclass_seg_loss_prefers_the_truth_and_skips_ignored_voxels():
    t = torch.zeros(1, 3, 4)
    t[0, 0, :2] = 1
    t[0, 2, 2] = 1              # voxel 3: ignored (all zero)
    good = torch.full((1, 3, 4), -5.0)
    good[0, 0, :2] = 5
    good[0, 2, 2] = 5
    bad = good.flip(1)
    assert L.multiclass_seg_loss(good, t) < 0.1 < L.multiclass_seg_loss(bad, t)
    changed = good.clone()
    changed[0, :, 3] = torch.tensor([9.0, -9.0, 0.0])
    assert L.multiclass_seg_loss(changed, t) == pytest.approx(float(L.multiclass_seg_loss(good, t)))


def test_inplane_coordinates_do_not_depend_on_the_slab():
    full = coordinate_channels((32, 8, 8), "cpu", torch.float32, "inplane")
    slab = coordinate_channels((16, 8, 8), "cpu", torch.float32, "inplane")
    assert torch.equal(full[:, :16], slab) and not full[2].any()
    crop = coordinate_channels((16, 8, 8), "cpu", torch.float32, "crop")
    assert crop[2].abs().max() == 1.0


def test_slab_crops_keep_image_labels_and_presence_together(tmp_path):
    corpus = make_tiny_corpus(tmp_path / "c", n=2, shape=(64, 32, 40))
    cfg = ModelConfig(**TINY)
    ds = ManifestDataset(corpus, cfg.spec, cfg.anatomies, augment=True, feature_stride=2,
                         seg_classes=CLASSES, crop={"prob": 1.0, "slices": [16]})
    ds.augment.affine.prob = 0.0   # presence follows the crop; the small affine comes after it
    full = ds.case(0)
    seen_absent = False
    for seed in range(12):
        s = ds.sample(0, aug_seed=seed)
        assert s["image"].shape[1] == 16 and s["seg"].shape[1] == 8
        assert s["seg"].shape[0] == len(CLASSES) + 1
        assert torch.allclose(s["seg"].sum(0), torch.ones(8, *s["seg"].shape[2:]))
        i_les = [i for i, it in enumerate(ds_items()) if it[0] == "liver_lesion"][0]
        lesion = s["find_full"][i_les]
        assert bool(s["presence"][i_les] > 0.5) == bool(lesion.any())
        seen_absent |= not bool(lesion.any())
    assert full.presence.max() == 1.0 and seen_absent   # crops that miss the lesion say so


def ds_items():
    from ctlanguage.training import phrases as PH

    return PH.finding_items()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    corpus = make_tiny_corpus(tmp / "c", n=4, shape=(48, 32, 40))
    torch.set_num_threads(1)
    out = tmp / "run"
    cfg = {"model": dict(TINY),
           "data": {"train": {"manifest": str(corpus)}, "calib": {"manifest": str(corpus)}},
           "crop": {"prob": 0.5, "slices": [16, 32], "label_shift_prob": 0.5, "label_shift_sd": 0.02},
           "train": {"steps": 3, "batch_size": 2, "eval_every": 0, "checkpoint_every": 3, "log_every": 1,
                     "seed": 1},
           "losses": {"seg_head": 1.0, "finding_seg": 1.0, "anatomy_prompts": 2,
                      "pool_predicted_masks": 1.0},
           "output": str(out), "export": str(tmp / "export")}
    run_training(cfg, quiet=True)
    return out, tmp / "export"


def test_training_with_the_seg_head(trained):
    out, export = trained
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["seg_head"]) and np.isfinite(r["finding_seg"]) for r in rows)
    m = GroundedCTModel.from_pretrained(export, device="cpu")
    assert m.seg_head is not None and m.config.seg_classes == CLASSES
    assert m.config.coord_mode == "inplane" and m.config.calibration["n_cases"] == 4
    # each anatomy's mask source was chosen on the calibration split (seg head where it is as good)
    src = m.config.calibration["anatomy_source"]["dice_seg_head_mask_head_n"]
    assert set(m.config.seg_anatomies) == {a for a, (s, d, n) in src.items()
                                           if members(a, CLASSES) and not s < d}


def test_engine_takes_known_anatomy_and_finding_masks_from_the_seg_head(trained):
    from ctlanguage.backends import grounded

    _, export = trained
    b = grounded.load(model_dir=export, device="cpu", warm_text=False)
    arr = np.full((30, 40, 40), -1000.0, np.float32)
    arr[3:27, 6:34, 5:35] = 40.0
    arr[16:26, 10:30, 8:18] = -850.0
    vol = CTVolume(arr, np.diag([5.0, 5.0, 5.0, 1.0]))
    check_backend(b, vol)
    st = b.encode(vol)
    with torch.inference_mode():
        from ctlanguage.preprocess import to_model_space

        x = torch.from_numpy(to_model_space(vol, b.config.spec).array.astype(np.float32))[None, None]
        dense = b.model.encode_image(x).dense
        cl, fl = b.model.seg_logits(dense)
        ref, _ = anatomy_logits(cl[0], ["liver"], CLASSES)
        alt = b.model.mask_logits(dense, b.embed([canonical_phrase("liver")]))[0]
    ans = b.answer(st, Request(text="liver", kind="anatomy", anatomies=("liver",)))
    want = ref[0] if "liver" in b.config.seg_anatomies else alt[0]
    assert np.allclose(ans.logit, want.numpy(), atol=1e-4)
    req = Request(text="liver lesion", kind="finding", anatomies=("liver",), finding="liver_lesion")
    ans = b.answer(st, req)
    inside = st.region(["liver"], grounded.RESTRICT_DILATION)
    assert np.allclose(ans.logit[inside], fl[0, 0].numpy()[inside], atol=1e-4)
    assert (ans.logit[~inside] == grounded.OUTSIDE_LOGIT).all()
    # the encoding (with its finding channels) survives the cache round trip
    again = b.restore(st.metadata(), st.tensors())
    assert np.array_equal(b.answer(again, req).logit, ans.logit)


def test_v2_style_config_has_no_seg_head(random_model):
    m = GroundedCTModel.from_pretrained(random_model, device="cpu")
    assert m.seg_head is None and m.config.coord_mode == "crop"
    with pytest.raises(ValueError):
        m.seg_logits(torch.zeros(1, 8, 2, 2, 2))


def test_feature_grid_targets_equal_average_pooling():
    """The faster target builders give exactly what avg_pool3d of the binary masks gave."""
    import torch.nn.functional as F

    from ctlanguage.training.dataset import block_mean, class_fractions

    rng = np.random.default_rng(0)
    masks = torch.from_numpy((rng.random((3, 8, 6, 4)) > 0.6).astype(np.uint8))
    masks[1] = 0
    ref = F.avg_pool3d(masks[None].float(), 2)[0]
    assert torch.equal(block_mean(masks, 2), ref)
    cls = rng.integers(-1, 4, (8, 6, 4))        # -1: ignored voxels
    frac = class_fractions(np.where(cls < 0, -100, cls), 4, 2)
    onehot = torch.stack([torch.from_numpy(cls == k) for k in range(4)]).float()
    assert torch.allclose(frac, F.avg_pool3d(onehot[None], 2)[0])

"""Stage 2: train the language side on frozen, cached stage-1 features.

The image encoder and the seg head of a stage-1 model are frozen; their features are computed
once per case (training/features.py) and the text projection, mask head, organ pooling and
logit scale are trained on them for many epochs in minutes on a CPU. ``ctlanguage train`` runs
this for a config with ``"stage": 2`` (configs/stage2-*.json, docs/training.md):

    {"stage": 2, "stage1": MODEL_DIR, "features": CACHE_ROOT,
     "data": {"train": [MANIFEST or {"manifest", "phantom"}, ...], "calib": ..., "eval": [...]},
     "model": {overrides, e.g. "presence_source"}, "reinit_language": true,
     "losses": {...}, "train": {"steps", "batch_size", "lr", ...}, "output": DIR}

The result is an ordinary model folder (stage-1 encoder + new language side), calibrated on the
calibration split's cached features with the same Platt fit as stage 1.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..model import GroundedCTModel
from .train import ensure_corpus
from .features import FeatureSet, cache_dir_for, cache_features, collate_features, subsample_voxels

log = logging.getLogger(__name__)

LANGUAGE_MODULES = ("text_projection", "mask_head", "organ_pool")


def _abs(p, base: Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else base / p


def feature_sets(cfg: dict, base: Path, model, splits=("train", "calib", "eval"), quiet=False,
                 preload: bool = True) -> dict:
    """Cache (once, resumable) and open the features of every manifest named in cfg["data"]."""
    root = _abs(cfg["features"], base)
    out = {}
    for split in splits:
        manifests = cfg.get("data", {}).get(split)
        if not manifests:
            continue
        dirs = []
        for spec in manifests if isinstance(manifests, list) else [manifests]:
            # a manifest path, or {"manifest": path, "phantom": {"n", "seed", ...}} as in stage 1
            # (the phantom corpus is generated when the manifest does not exist yet)
            m = ensure_corpus(spec if isinstance(spec, dict) else {"manifest": spec}, base)
            d = cache_dir_for(root, model, split_name(m))
            log.info("features of %s -> %s", m, d)
            cache_features(model, m, d, progress=None if quiet else _bar(f"features {m.parent.name}"))
            dirs.append(d)
        train = split == "train"
        out[split] = FeatureSet(dirs, preload=preload, full=not train,
                                seg=not train or bool(cfg.get("train_seg_head", False)))
    return out


def split_name(manifest: Path) -> str:
    """Cache folder name of a manifest: its folder's name + a short hash of its absolute path."""
    import hashlib

    return f"{manifest.parent.name}-{hashlib.sha1(str(manifest.resolve()).encode()).hexdigest()[:8]}"


def _bar(desc):
    from tqdm import tqdm

    state = {}

    def cb(done, total):
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, dynamic_ncols=True,
                                mininterval=1.0 if sys.stderr.isatty() else 30.0)
        state["bar"].n = done
        state["bar"].refresh()
        if done == total:
            state["bar"].close()

    return cb


def reinit_language(model: GroundedCTModel, seed: int) -> None:
    """Fresh initialisation of the language side (same seed → same start for every variant)."""
    torch.manual_seed(seed)
    fresh = GroundedCTModel(model.config, text_encoder=model.text_encoder)
    for name in LANGUAGE_MODULES:
        getattr(model, name).load_state_dict(getattr(fresh, name).state_dict())
    with torch.no_grad():
        model.log_logit_scale.copy_(fresh.log_logit_scale)


def freeze_stage1(model: GroundedCTModel, train_seg_head: bool = False) -> list:
    """requires_grad False on the encoder (and the seg head unless it is trained here); returns
    the trainable parameters."""
    for name in ("image_encoder",) if train_seg_head else ("image_encoder", "seg_head"):
        mod = getattr(model, name)
        if mod is not None:
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)
    return [p for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith("consistency_predictor")]


def run_stage2(cfg: dict, config_path: str | None = None, resume: bool = True, quiet: bool = False) -> Path:
    from . import train as T

    base = Path(cfg.get("base_dir", "."))
    out = _abs(cfg.get("output", "runs/stage2"), base)
    tcfg = {**T.DEFAULT_TRAIN, "batch_size": 8, **cfg.get("train", {})}
    # "train_seg_head": the seg head learns too (on the cached class fractions), e.g. a new 3x3x3
    # one (model.seg_head_kernel); else it stays the stage-1 head, frozen
    train_seg = bool(cfg.get("train_seg_head", False))
    lcfg = {**T.DEFAULT_LOSSES, **cfg.get("losses", {}), "consistency": 0.0}
    if not train_seg:
        lcfg.update(seg_head=0.0, finding_seg=0.0)
    seed = int(tcfg["seed"])
    threads_before = torch.get_num_threads()
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    try:
        model = GroundedCTModel.from_pretrained(_abs(cfg["stage1"], base), device="cpu")
        out.mkdir(parents=True, exist_ok=True)
        # train.preload false: read each case from the cache when drawn (~0.1 s each) instead of
        # holding ~8 MB a case in memory
        sets = feature_sets(cfg, base, model, splits=("train", "calib"), quiet=quiet,
                            preload=bool(tcfg.get("preload", True)))
        stage1_training = dict(model.config.training or {})
        head = (model.config.seg_head_kernel, model.config.seg_head_hidden)
        for k, v in cfg.get("model", {}).items():
            setattr(model.config, k, v)
        model.config.seg_anatomies = None          # re-chosen by calibration
        model.config.validate()
        if cfg.get("reinit_language", True):
            reinit_language(model, seed)
        if (model.config.seg_head_kernel, model.config.seg_head_hidden) != head:
            if not train_seg:
                raise ValueError("a new seg head architecture needs \"train_seg_head\": true")
            from ..model.seg_head import SegHead

            torch.manual_seed(seed)
            c = model.config
            model.seg_head = SegHead(c.dense_channels, len(c.seg_classes), len(c.seg_findings),
                                     c.seg_head_kernel, c.seg_head_hidden)
        if train_seg and "seg" not in sets["train"].sample(0):
            raise ValueError("these cached features have no seg-class targets")
        voxels = int(tcfg.get("voxels_per_case", 0))   # 0: the whole feature grid
        if voxels and train_seg and model.config.seg_head_kernel != 1:
            raise ValueError("a 3x3x3 seg head needs the whole grid (train.voxels_per_case 0)")
        params = freeze_stage1(model, train_seg)
        objective = T.TrainingObjective(model, lcfg)
        optimizer = torch.optim.AdamW(params, lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))
        steps = int(tcfg["steps"])
        scheduler = T._make_scheduler(optimizer, int(tcfg["warmup_steps"]), steps)
        start = T._load_training_state(out, model, optimizer, scheduler) if resume else 0
        train = sets["train"]
        n, bs = len(train), int(tcfg["batch_size"])
        bar = None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=start, desc="stage 2", dynamic_ncols=True,
                       mininterval=1.0 if sys.stderr.isatty() else 30.0)
        running: dict = {}
        t0 = time.time()
        model.train()
        freeze_stage1(model, train_seg)
        for step in range(start, steps):
            per_epoch = max(1, n // bs)
            epoch, k = divmod(step, per_epoch)
            perm = np.random.default_rng([seed, epoch]).permutation(n)
            samples = [train.sample(int(perm[(k * bs + j) % n])) for j in range(bs)]
            if voxels:
                vrng = np.random.default_rng([seed, step, 3])
                samples = [subsample_voxels(smp, voxels, vrng) for smp in samples]
            batch = collate_features(samples)
            loss, parts = objective(batch, step_seed=seed * 1000003 + step * 17)
            T.optimizer_step(loss, parts, optimizer, scheduler, params, tcfg["grad_clip"], running, bar)
            done = step + 1
            if done % int(tcfg["log_every"]) == 0 or done == steps:
                with open(out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps({"step": done, "time_s": round(time.time() - t0, 1),
                                         **{key: round(v, 4) for key, v in running.items()}}) + "\n")
            if done % int(tcfg["checkpoint_every"]) == 0 or done == steps:
                model.config.training = _provenance(cfg, config_path, done, stage1_training)
                T._save_training_state(out, model, optimizer, scheduler, done, cfg)
        if bar is not None:
            bar.close()
        model.eval()
        model.config.training = _provenance(cfg, config_path, steps, stage1_training)
        if "calib" in sets:
            calib = cfg["data"]["calib"]
            calib = calib[0] if isinstance(calib, list) else calib
            calibrate_on_features(model, sets["calib"], str(calib["manifest"] if isinstance(calib, dict) else calib))
        final = model.save_pretrained(out / "final")
        if cfg.get("export"):
            model.save_pretrained(_abs(cfg["export"], base))
        return final
    finally:
        torch.set_num_threads(threads_before)


def _provenance(cfg: dict, config_path, steps: int, stage1_training: dict | None = None) -> dict:
    from . import train as T

    return {"stage": 2, "stage1": str(cfg["stage1"]), "stage1_training": stage1_training or {},
            "config_file": str(config_path) if config_path else None,
            "steps": steps, "seed": cfg.get("train", {}).get("seed", 0),
            "data": cfg.get("data", {}), "losses": {**T.DEFAULT_LOSSES, **cfg.get("losses", {})},
            "reinit_language": bool(cfg.get("reinit_language", True)),
            "train_seg_head": bool(cfg.get("train_seg_head", False)), "torch": torch.__version__}


@torch.no_grad()
def calibrate_on_features(model: GroundedCTModel, features: FeatureSet, name: str) -> dict:
    """Anatomy-source choice and Platt calibration (train.calibrate's rules) on cached features."""
    from . import train as T

    source = T.choose_anatomy_source(model, features) if model.seg_head is not None else None
    pred = T.collect_predictions(model, features)
    zc, yc, names = T.case_level(pred["logits"], pred["labels"], pred["items"])
    temp, bias = T.fit_platt(zc, yc, names)
    before, after = T.summarize(pred, 1.0), T.summarize(pred, temp, bias)
    model.config.calibration_temperature, model.config.calibration_bias = temp, bias
    model.config.calibration = {
        "method": "p = sigmoid(logit / T + b[finding]) (train.fit_platt) on cached stage-1 features",
        "manifest": name, "n_cases": int(pred["labels"].shape[0]), "ece_uncalibrated": before["ece"],
        "ece_after": after["ece"], "auc": after["mean_finding_auc"]}
    if source is not None:
        model.config.calibration["anatomy_source"] = {
            "rule": "seg head where its mean Dice on this split is >= the mask head's, else the mask head",
            "dice_seg_head_mask_head_n": source}
    log.info("stage-2 calibration T=%.3f (ECE %.4f -> %.4f)", temp, before["ece"], after["ece"])
    return model.config.calibration


def main(argv=None) -> int:
    """python -m ctlanguage.training.stage2 --config FILE: cache the features of every split of a
    stage-2 config (train, calib, eval) once, before several variants train on them."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    torch.set_num_threads(a.threads)
    cfg = json.loads(Path(a.config).read_text())
    base = Path(cfg.get("base_dir", "."))
    model = GroundedCTModel.from_pretrained(_abs(cfg["stage1"], base), device="cpu")
    for split, fs in feature_sets(cfg, base, model, preload=False).items():
        print(f"{split}: {len(fs)} cases in {sorted({str(f.parent) for f in fs.files})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

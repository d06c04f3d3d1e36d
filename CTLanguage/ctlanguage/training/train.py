"""Training loop, quick held-out metrics and temperature calibration.

``run_training(config_dict)`` is what ``ctlanguage train --config FILE`` calls. The config is
JSON (see configs/ and docs/training.md). Data parallel through torchrun: each process takes
every world_size-th case of a seeded permutation; gradients are averaged by DDP.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..metrics import dice, expected_calibration_error, roc_auc
from ..model import GroundedCTModel, ModelConfig
from ..model.seg_head import members
from . import distributed as D
from . import losses as L
from . import phrases as PH
from .dataset import ManifestDataset, collate
from ..phrases import canonical_phrase

log = logging.getLogger(__name__)

DEFAULT_LOSSES = {
    "seg": 1.0, "organ_contrastive": 0.5, "fn_calibration": True, "abnormality_dictionary": True,
    "dictionary_negatives": 64, "presence": 1.0, "consistency": 0.0, "global_clip": 0.0,
    "absent_finding_prompts": 6, "anatomy_prompts": 0, "unsided_prompt_prob": 0.25,
    "presence_pos_weight": None, "pool_predicted_masks": 0.0, "seg_head": 0.0, "finding_seg": 0.0,
    "varied_normal_sentences": False,
}
DEFAULT_TRAIN = {
    "steps": 200, "batch_size": 2, "lr": 2e-3, "weight_decay": 1e-4, "warmup_steps": 20,
    "seed": 0, "eval_every": 100, "checkpoint_every": 50, "log_every": 10, "amp": True,
    "grad_clip": 5.0, "device": None, "threads": None,
}


# ------------------------------------------------------------------------------ objective
class TrainingObjective(nn.Module):
    """Computes all enabled losses for one batch (wrapped by DDP when distributed)."""

    def __init__(self, model: GroundedCTModel, losses: dict):
        super().__init__()
        self.model = model
        self.cfg = {**DEFAULT_LOSSES, **losses}
        self.items = PH.finding_items()
        self.judged = [a for a in PH.judged_anatomies() if a in model.config.anatomies]
        self.judged_idx = [model.config.anatomies.index(a) for a in self.judged]
        self.item_judged = [self.judged.index(a) if a in self.judged else -1 for _, _, a in self.items]
        item_of = {(f, s): i for i, (f, s, _) in enumerate(self.items)}
        self.seg_items = [item_of.get(tuple(fs)) for fs in model.config.seg_findings]

    # --- phrase plans ------------------------------------------------------------------
    def _seg_prompts(self, batch, rng):
        m = self.model
        anat, find, known = batch["anat"], batch["find"], batch["find_known"]
        prompts, targets = [], []
        A = len(m.config.anatomies)
        a_order = list(range(A))
        k_anat = int(self.cfg["anatomy_prompts"]) or A
        if k_anat < A:
            a_order = sorted(rng.choice(A, size=k_anat, replace=False).tolist())
        for a_i in a_order:
            a = m.config.anatomies[a_i]
            if anat[:, a_i].sum() <= 0:
                continue
            ph = PH.phrases_for(a)
            prompts.append(ph[int(rng.integers(len(ph)))])
            targets.append(anat[:, a_i])
        present = [i for i in range(len(self.items)) if bool(known[:, i].all())
                   and float(find[:, i].sum()) > 0]
        absent = [i for i in range(len(self.items)) if bool(known[:, i].all()) and i not in present]
        rng.shuffle(absent)
        chosen = present + absent[: int(self.cfg["absent_finding_prompts"])]
        for i in chosen:
            f, s, _ = self.items[i]
            if s is not None and rng.random() < self.cfg["unsided_prompt_prob"]:
                j = self.items.index((f, "left" if s == "right" else "right", self.items[i][2].replace(
                    s, "left" if s == "right" else "right")))
                if bool(known[:, j].all()):
                    ph = PH.phrases_for(f, None)
                    prompts.append(ph[int(rng.integers(len(ph)))])
                    targets.append((find[:, i] + find[:, j]).clamp(max=1.0))
                    continue
            ph = PH.phrases_for(f, s)
            prompts.append(ph[int(rng.integers(len(ph)))])
            targets.append(find[:, i])
        return prompts, torch.stack(targets, 1) if targets else None

    def _report_texts(self, batch, rng):
        """Per (case, judged anatomy): a sentence about that organ from the report's findings,
        or '<organ> shows no significant abnormalities'."""
        pres = batch["presence"]
        texts, normal, anat = [], [], []
        for b in range(pres.shape[0]):
            for j, a in enumerate(self.judged):
                found = [i for i, (_, _, ia) in enumerate(self.items) if ia == a and pres[b, i] > 0.5]
                if found:
                    parts = [PH.finding_sentence(self.items[i][0], self.items[i][1], rng) for i in found]
                    texts.append(" and ".join(parts))
                    normal.append(False)
                else:
                    texts.append(PH.normal_sentence(a, rng if self.cfg["varied_normal_sentences"] else None))
                    normal.append(True)
                anat.append(a)
        return texts, normal, anat

    def _global(self, m, feats, dense, batch):
        """[B,E] whole-image embedding: the encoder's global head ("global"), or attention
        pooling over the whole body on the same dense features as the organs ("body")."""
        if m.config.presence_source == "body":
            body = batch["anat"][:, [m.anatomy_index("body")]].to(dense.device)
            return m.organ_embeddings(dense, body, anatomies=["body"])[:, 0]
        if feats is None:
            raise ValueError("cached features have no global embedding: use presence_source 'body'")
        return feats.global_embedding

    # --- forward -------------------------------------------------------------------------
    def forward(self, batch: dict, step_seed: int):
        m, cfg = self.model, self.cfg
        rng = np.random.default_rng(step_seed)
        dev = m.device
        if "dense" in batch:   # stage 2: cached features of the frozen encoder
            feats, dense = None, batch["dense"].to(dev)
        else:
            feats = m.encode_image(batch["image"].to(dev))
            dense = feats.dense
        parts = {}
        if m.seg_head is not None and (cfg["seg_head"] > 0 or cfg["finding_seg"] > 0):
            cl, fl = m.seg_logits(dense)   # losses on the feature grid against soft targets
            if cfg["seg_head"] > 0:
                parts["seg_head"] = L.multiclass_seg_loss(cl, batch["seg"].to(dev))
            known = batch["find_known"]
            sel = [(c, i) for c, i in enumerate(self.seg_items) if i is not None and bool(known[:, i].all())]
            if cfg["finding_seg"] > 0 and fl is not None and sel:
                tgt = batch["find"][:, [i for _, i in sel]].to(dev)
                parts["finding_seg"] = L.seg_loss(fl[:, [c for c, _ in sel]], tgt)
        if cfg["seg"] > 0:
            prompts, targets = self._seg_prompts(batch, rng)
            if prompts:
                t = m.embed_text(prompts)
                logits = m.mask_logits(dense, t)
                parts["seg"] = L.seg_loss(logits, targets.to(dev))
        need_organ = cfg["organ_contrastive"] > 0 or (cfg["presence"] > 0 and m.config.presence_source == "organ") \
            or cfg["consistency"] > 0
        if need_organ:
            masks = batch["anat"][:, self.judged_idx].to(dev)
            p_pred = float(cfg.get("pool_predicted_masks") or 0.0)
            if p_pred > 0 and rng.random() < p_pred:
                # pool inside the model's own (detached, thresholded) organ masks, as inference
                # does: with ground-truth masks only, held-out AUC was 0.67 with true masks but
                # 0.57 with predicted ones (step 1600 of v2)
                with torch.no_grad():
                    tj = m.embed_text([canonical_phrase(a) for a in self.judged])
                    masks = (m.anatomy_mask_logits(dense.detach(), self.judged, tj) > 0).to(dense.dtype)
            emb = m.organ_embeddings(dense, masks, anatomies=self.judged)    # [B,J,E]
        glob = self._global(m, feats, dense, batch) if (cfg["global_clip"] > 0 or (
            cfg["presence"] > 0 and m.config.presence_source != "organ")) else None
        if cfg["organ_contrastive"] > 0:
            texts, normal, anat = self._report_texts(batch, rng)
            txt = m.embed_text(texts)
            extra, valid = None, None
            if cfg["abnormality_dictionary"]:
                dic = PH.abnormality_dictionary()
                k = min(int(cfg["dictionary_negatives"]), len(dic))
                sel = rng.choice(len(dic), size=k, replace=False)
                extra = m.embed_text([dic[i][0] for i in sel])
                pres = batch["presence"]
                valid = torch.ones(len(texts), k, dtype=torch.bool)
                item_of = {(f, s): i for i, (f, s, _) in enumerate(self.items)}
                sel_items = [item_of[(dic[di][1], dic[di][2])] for di in sel]
                for r in range(len(texts)):
                    b, j = divmod(r, len(self.judged))
                    for c, i in enumerate(sel_items):
                        if (self.items[i][2] == self.judged[j] and pres[b, i] > 0.5) or texts[r] == dic[sel[c]][0]:
                            valid[r, c] = False
            parts["organ_contrastive"] = L.organ_contrastive_loss(
                emb.reshape(-1, emb.shape[-1]), txt, m.logit_scale, texts, normal, anat,
                fn_calibration=bool(cfg["fn_calibration"]), extra_txt=extra, extra_valid=valid)
        if cfg["presence"] > 0:
            logits, labels = [], []
            for i, (f, s, a) in enumerate(self.items):
                pos, neg = PH.ensemble_for(f, s)
                pe, ne = m.embed_text(list(pos)), m.embed_text(list(neg))
                if m.config.presence_source != "organ":
                    src = glob
                else:
                    if self.item_judged[i] < 0:
                        continue
                    src = emb[:, self.item_judged[i]]
                logits.append(m.presence_logit(src, pe, ne))
                labels.append(batch["presence"][:, i])
            if logits:
                pw = cfg.get("presence_pos_weight")
                parts["presence"] = L.presence_loss(torch.stack(logits, 1), torch.stack(labels, 1).to(dev),
                                                    pos_weight=None if pw is None else float(pw))
        if cfg["global_clip"] > 0:
            rep = [r if r else "no report" for r in batch["report"]]
            t = m.embed_text(rep)
            bank = [r for r in batch.get("report_bank", []) if r not in rep]
            extra = m.embed_text(bank) if bank else None
            parts["global_clip"] = L.global_clip_loss(glob, t, m.logit_scale, extra)
        if cfg["consistency"] > 0 and "image2" in batch:
            f2 = m.encode_image(batch["image2"].to(dev))
            emb2 = m.organ_embeddings(f2.dense, batch["anat"][:, self.judged_idx].to(dev), anatomies=self.judged)
            z1 = torch.cat([emb.reshape(-1, emb.shape[-1]), feats.global_embedding])
            z2 = torch.cat([emb2.reshape(-1, emb2.shape[-1]), f2.global_embedding])
            pred = m.consistency_predictor
            parts["consistency"] = L.consistency_loss(pred(z1), z1, pred(z2), z2)
        total = sum(float(cfg[k]) * v for k, v in parts.items())
        # keep every parameter in the graph (DDP without unused-parameter bookkeeping issues)
        total = total + 0.0 * sum(p.sum() for p in m.parameters() if p.requires_grad)
        return total, {k: float(v.detach()) for k, v in parts.items()}


# ------------------------------------------------------------------------------ evaluation


def encode_sample(model: GroundedCTModel, s: dict):
    """(ImageFeatures or None, dense [1,C,d,h,w]) of a dataset sample: the cached stage-1
    features when it has them (training/features.py), else the model's encoder."""
    if "dense" in s:
        return None, s["dense"][None].to(model.device)
    feats = model.encode_image(s["image"][None])
    return feats, feats.dense


@torch.no_grad()
def collect_predictions(model: GroundedCTModel, dataset: ManifestDataset, heldout: dict | None = None,
                        progress=None) -> dict:
    """Run the model on every case of ``dataset`` (no augmentation).

    Returns per-anatomy Dice, per-finding-item Dice, and presence logits/labels for the
    vocabulary ensembles (and for held-out paraphrase ensembles when ``heldout`` maps
    (finding, laterality) -> list of positive phrasings)."""
    model.eval()
    items = PH.finding_items()
    anatomies = model.config.anatomies
    a_prompts = [canonical_phrase(a) for a in anatomies]
    f_prompts = [canonical_phrase(f, s) for f, s, _ in items]
    ta = model.embed_text(a_prompts)
    tf = model.embed_text(f_prompts)
    chan_f = model.finding_channels([(f, s) for f, s, _ in items]) if model.seg_head is not None else None
    ens = [PH.ensemble_for(f, s) for f, s, _ in items]
    pe = [model.embed_text(list(p)) for p, _ in ens]
    ne = [model.embed_text(list(n)) for _, n in ens]
    hp = None
    if heldout:
        hp = [model.embed_text(list(heldout[(f, s)])) if heldout.get((f, s)) else None for f, s, _ in items]
    organ_dice = {a: [] for a in anatomies}
    finding_dice = {i: [] for i in range(len(items))}
    logits, logits_para, labels = [], [], []
    for n in range(len(dataset)):
        s = dataset.sample(n)
        feats, dense = encode_sample(model, s)
        la = model.anatomy_mask_logits(dense, anatomies, ta)[0]
        lf = model.mask_logits(dense, tf)[0]
        if model.seg_head is not None and chan_f and any(ch is not None for ch in chan_f):
            fl = model.seg_logits(dense)[1][0]
            lf = torch.stack([fl[ch] if ch is not None else lf[i] for i, ch in enumerate(chan_f)])
        st = model.config.feature_stride
        up = (lambda z: z) if st == 1 else \
            (lambda z: F.interpolate(z[None], scale_factor=st, mode="trilinear", align_corners=False)[0])
        pa_full, pf_full = up(la) > 0, up(lf) > 0
        gt_a = s["anat_full"].numpy()
        for a_i, a in enumerate(anatomies):
            if gt_a[a_i].any():
                organ_dice[a].append(dice(pa_full[a_i].numpy(), gt_a[a_i]))
        gt_f = s["find_full"].numpy()
        for i in range(len(items)):
            if s["presence"][i] > 0.5 and s["find_known"][i] and gt_f[i].any():
                finding_dice[i].append(dice(pf_full[i].numpy(), gt_f[i]))
        # presence from organ embeddings pooled in *predicted* anatomy masks (as the engine does)
        pred_masks = torch.sigmoid(la[None])
        pred_masks = (pred_masks > 0.5).to(pred_masks.dtype)
        source = model.config.presence_source
        if source == "global":
            if feats is None:
                raise ValueError("cached features have no global embedding (presence_source 'global')")
            src_all = None
        else:
            src_all = model.organ_embeddings(dense, pred_masks)[0]
        row, row_p = [], []
        for i, (f, sd, a) in enumerate(items):
            src = feats.global_embedding[0] if src_all is None else \
                src_all[anatomies.index("body" if source == "body" else a)]
            row.append(float(model.presence_logit(src, pe[i], ne[i])))
            if hp is not None:
                row_p.append(float(model.presence_logit(src, hp[i], ne[i])) if hp[i] is not None else float("nan"))
        logits.append(row)
        logits_para.append(row_p)
        labels.append(s["presence"].numpy())
        if progress:
            progress(n + 1, len(dataset))
    return dict(organ_dice=organ_dice, finding_dice=finding_dice, logits=np.array(logits),
                logits_para=np.array(logits_para) if hp is not None else None,
                labels=np.array(labels), items=items)


def _bias_row(bias: dict | None, items) -> np.ndarray:
    names = list(dict.fromkeys(it[0] for it in items))
    b = bias or {}
    return np.array([b.get(f, b.get("_default", 0.0)) for f in names])


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the binary NLL of sigmoid(logit / T) (grid + golden refinement)."""
    z, y = np.asarray(logits, float).ravel(), np.asarray(labels, float).ravel()

    def nll(t):
        q = z / t
        return float(np.mean(np.logaddexp(0, q) - y * q))

    grid = np.exp(np.linspace(np.log(0.05), np.log(50), 200))
    t0 = grid[int(np.argmin([nll(t) for t in grid]))]
    lo, hi = t0 / 1.05, t0 * 1.05
    for _ in range(60):
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def case_level(logits: np.ndarray, labels: np.ndarray, items) -> tuple[np.ndarray, np.ndarray, list]:
    """Per (case, finding): max logit over sides and 'present on any side' — what the engine
    reports for an unsided prompt (max of the per-side probabilities; sigmoid is monotonic)."""
    names = list(dict.fromkeys(it[0] for it in items))
    z = np.stack([logits[:, [i for i, it in enumerate(items) if it[0] == f]].max(1) for f in names], 1)
    y = np.stack([labels[:, [i for i, it in enumerate(items) if it[0] == f]].max(1) for f in names], 1)
    return z, y, names


def fit_platt(z: np.ndarray, y: np.ndarray, names: list, C: float = 1.0) -> tuple[float, dict]:
    """Shared temperature + per-finding offset (logistic regression on [z, one-hot finding],
    L2-regularised offsets so rare findings shrink toward the shared one)."""
    from sklearn.linear_model import LogisticRegression

    n, k = z.shape
    X = np.zeros((n * k, 1 + k))
    X[:, 0] = z.reshape(-1)
    X[np.arange(n * k), 1 + np.tile(np.arange(k), n)] = 1.0
    yy = y.reshape(-1)
    lr = LogisticRegression(C=C, fit_intercept=True, max_iter=2000)
    lr.fit(X, yy)
    a = float(lr.coef_[0, 0])
    T = 1.0 / a if a > 1e-3 else 1e3
    b0 = float(lr.intercept_[0])
    bias = {"_default": b0 + float(np.mean(lr.coef_[0, 1:]))}
    for j, f in enumerate(names):
        bias[f] = b0 + float(lr.coef_[0, 1 + j])
    return float(T), bias


def summarize(pred: dict, temperature: float = 1.0, bias: dict | None = None) -> dict:
    items = pred["items"]
    organ = {a: float(np.mean(v)) for a, v in pred["organ_dice"].items() if v}
    fd: dict[str, list] = {}
    for i, v in pred["finding_dice"].items():
        if v:
            fd.setdefault(items[i][0], []).extend(v)
    finding_dice = {f: float(np.mean(v)) for f, v in fd.items()}

    def aucs(lg):
        z_all, y_all, names = case_level(lg, pred["labels"], items)
        out = {}
        for k, f in enumerate(names):
            z, y = z_all[:, k], y_all[:, k]
            ok = ~np.isnan(z)
            if ok.any() and 0 < y[ok].sum() < ok.sum():
                out[f] = roc_auc(y[ok], z[ok])
        return out

    auc = aucs(pred["logits"])
    zc, yc, _ = case_level(pred["logits"], pred["labels"], items)
    res = {
        "mean_organ_dice": float(np.mean(list(organ.values()))) if organ else float("nan"),
        "mean_finding_dice": float(np.mean(list(finding_dice.values()))) if finding_dice else float("nan"),
        "mean_finding_auc": float(np.mean(list(auc.values()))) if auc else float("nan"),
        "ece": expected_calibration_error(1 / (1 + np.exp(-(zc / temperature + _bias_row(bias, items)))), yc),
        "ece_per_side": expected_calibration_error(1 / (1 + np.exp(-pred["logits"] / temperature)),
                                                   pred["labels"]),
        "organ_dice": organ, "finding_dice": finding_dice, "finding_auc": auc,
        "n_cases": int(pred["labels"].shape[0]),
    }
    if pred.get("logits_para") is not None and pred["logits_para"].size:
        pa = aucs(pred["logits_para"])
        common = [f for f in pa if f in auc]
        res["paraphrase_auc"] = pa
        res["mean_paraphrase_auc"] = float(np.mean([pa[f] for f in common])) if common else float("nan")
        res["paraphrase_auc_drop"] = (float(np.mean([auc[f] for f in common])) - res["mean_paraphrase_auc"]) \
            if common else float("nan")
    return res


def heldout_ensembles() -> dict | None:
    """(finding, laterality) -> held-out positive phrasings from data/paraphrases_heldout.json,
    used for *evaluation only*. Understands a list of {"text","finding","laterality"} records or
    a {finding: [phrases]} mapping; returns None when the file is absent or not understood."""
    from ..resources import package_data_dir

    path = package_data_dir() / "paraphrases_heldout.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    recs = data.get("items", data.get("paraphrases", data)) if isinstance(data, dict) else data
    out: dict = {}
    keys = {(f, s) for f, s, _ in PH.finding_items()}
    if isinstance(recs, list):
        for r in recs:
            if not isinstance(r, dict) or r.get("kind", "finding") != "finding":
                continue
            f = r.get("finding") or r.get("key")
            text = r.get("text") or r.get("prompt") or r.get("phrase")
            lat = r.get("laterality")
            if not text:
                continue
            for s in ([lat] if lat in ("left", "right") else [None, "left", "right"]):
                if (f, s) in keys:
                    out.setdefault((f, s), []).append(text)
    # sided items without sided paraphrases: nothing (keeps the comparison honest)
    return out or None


# ------------------------------------------------------------------------------ checkpoints
def _save_training_state(out: Path, model, optimizer, scheduler, step: int, cfg: dict):
    from safetensors.torch import save_file

    ck = out / "checkpoint"
    tmp = out / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp / "model")
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    if tensors:
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
             "scheduler": scheduler.state_dict(), "config": cfg}
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
    if ck.exists():
        shutil.rmtree(ck)
    tmp.rename(ck)


def _load_training_state(out: Path, model, optimizer, scheduler) -> int:
    from safetensors.torch import load_file

    from ..model.checkpoint import load_state_dict, verify_checksums

    ck = out / "checkpoint"
    if not (ck / "state.json").is_file():
        return 0
    verify_checksums(ck / "model")
    sd = load_state_dict(ck / "model" / "model.safetensors")
    model.load_state_dict(sd)
    state = json.loads((ck / "state.json").read_text())
    tens = load_file(str(ck / "optimizer.safetensors")) if (ck / "optimizer.safetensors").is_file() else {}
    opt_state: dict = {}
    for k, v in tens.items():
        pid, name = k.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v.to(model.device)
    for k, v in state["optimizer_scalars"].items():
        pid, name = k.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


# ------------------------------------------------------------------------------ data
def ensure_corpus(spec: dict, base: Path) -> Path:
    """spec: {"manifest": path} and optionally {"phantom": {"n": N, "seed": S}} to generate the
    synthetic corpus (ctlanguage phantom) when the manifest does not exist yet."""
    manifest = Path(spec["manifest"])
    if not manifest.is_absolute():
        manifest = base / manifest
    if not manifest.is_file() and spec.get("phantom"):
        from ..phantom import write_corpus

        ph = spec["phantom"]
        log.info("generating %s synthetic cases (seed %s) in %s", ph["n"], ph["seed"], manifest.parent)
        write_corpus(manifest.parent, n=int(ph["n"]), seed=int(ph["seed"]),
                     **{k: v for k, v in ph.items() if k not in ("n", "seed")})
        cand = manifest.parent / "manifest.jsonl"
        if cand != manifest and cand.is_file() and not manifest.is_file():
            manifest = cand
    return manifest


def _init_from(model, directory, base: Path) -> None:
    """Start from another checkpoint's weights (checksums verified): every tensor whose name and
    shape match is copied; new modules (e.g. the seg head) keep their initialisation."""
    from ..model.checkpoint import load_state_dict, verify_checksums

    d = Path(directory)
    d = d if d.is_absolute() else base / d
    verify_checksums(d)
    src = load_state_dict(d / "model.safetensors")
    own = model.state_dict()
    same = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(same, strict=False)
    log.info("initialised %d of %d tensors from %s (new or reshaped: %s)", len(same), len(own), d,
             sorted(set(own) - set(same))[:8])


def _make_scheduler(optimizer, warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        q = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, q)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


# ------------------------------------------------------------------------------ main loop
def optimizer_step(loss, parts: dict, optimizer, scheduler, params, grad_clip, running: dict, bar=None) -> None:
    """One update (backward, optional gradient clipping, step, schedule) and the running means of
    the logged losses (shown on the progress bar); stage 1 and stage 2 share it."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, float(grad_clip))
    optimizer.step()
    scheduler.step()
    for k, v in {"loss": float(loss.detach()), **parts}.items():
        running[k] = 0.9 * running.get(k, v) + 0.1 * v
    if bar is not None:
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)


def run_training(cfg: dict, config_path: str | None = None, resume: bool = True, quiet: bool = False) -> Path:
    if int(cfg.get("stage", 1)) == 2:   # language side on frozen, cached features
        from .stage2 import run_stage2

        return run_stage2(cfg, config_path, resume=resume, quiet=quiet)
    tcfg = {**DEFAULT_TRAIN, **cfg.get("train", {})}
    lcfg = {**DEFAULT_LOSSES, **cfg.get("losses", {})}
    base = Path(cfg.get("base_dir", "."))
    out = Path(cfg.get("output", "runs/default"))
    if not out.is_absolute():
        out = base / out
    rank, world, device = D.setup(tcfg.get("device"))
    threads_before = torch.get_num_threads()
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))  # 1 is much faster on an oversubscribed CPU
    try:
        return _run(cfg, tcfg, lcfg, base, out, rank, world, device, config_path, resume, quiet)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg, tcfg, lcfg, base, out, rank, world, device, config_path, resume, quiet) -> Path:
    seed = int(tcfg["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    model_cfg = ModelConfig(**cfg.get("model", {}))
    spec = model_cfg.spec
    data = cfg["data"]
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        manifests = {k: ensure_corpus(v, base) for k, v in data.items()}
    D.barrier()
    manifests = {k: ensure_corpus({"manifest": v["manifest"]}, base) for k, v in data.items()}
    two_views = float(lcfg["consistency"]) > 0
    fs = model_cfg.feature_stride
    train_ds = ManifestDataset(manifests["train"], spec, model_cfg.anatomies, augment=True,
                               seed=seed, two_views=two_views, feature_stride=fs,
                               seg_classes=model_cfg.seg_classes, crop=cfg.get("crop"))
    val_ds = ManifestDataset(manifests["val"], spec, model_cfg.anatomies, feature_stride=fs) \
        if "val" in manifests and D.is_main() else None

    model = GroundedCTModel(model_cfg).to(device)
    objective = TrainingObjective(model, lcfg)
    wrapped = objective
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))
    steps = int(tcfg["steps"])
    scheduler = _make_scheduler(optimizer, int(tcfg["warmup_steps"]), steps)
    start = _load_training_state(out, model, optimizer, scheduler) if resume else 0
    if start and D.is_main():
        log.info("resuming from step %d", start)
    if not start and cfg.get("init_from"):
        _init_from(model, cfg["init_from"], base)
    use_amp = bool(tcfg["amp"]) and device.type == "cuda"
    bs = int(tcfg["batch_size"])
    n = len(train_ds)
    reports = [train_ds.case(i).report for i in range(n)] if lcfg["global_clip"] > 0 else []

    def batch_indices(step):
        per_epoch = max(1, n // (bs * world))
        epoch, k = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        lo = (k * world + rank) * bs
        return [int(perm[(lo + j) % n]) for j in range(bs)]

    bar = None
    if D.is_main() and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
    metrics_file = out / "metrics.jsonl"
    t0 = time.time()
    running: dict[str, float] = {}
    model.train()
    phases = sorted(cfg.get("phases", []), key=lambda ph: int(ph["from_step"]))
    for step in range(start, steps):
        # loss settings of the phase this step is in (later phases override earlier ones)
        # (and, from "model", the parameter-free presence rule)
        lc = dict(lcfg)
        for ph in phases:
            if step >= int(ph["from_step"]):
                lc.update(ph.get("losses", {}))
                if "presence_rule" in ph.get("model", {}):
                    model.config.presence_rule = ph["model"]["presence_rule"]
        objective.cfg = {**DEFAULT_LOSSES, **lc}
        idx = batch_indices(step)
        samples = [train_ds.sample(i, aug_seed=seed * 100003 + step * 131 + j * 7 + rank * 7919)
                   for j, i in enumerate(idx)]
        batch = collate(samples)
        if reports:
            r = np.random.default_rng([seed, step, 1])
            batch["report_bank"] = [reports[i] for i in r.choice(n, size=min(32, n), replace=False)]
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss, parts = wrapped(batch, step_seed=seed * 1000003 + step * 17 + rank)
        optimizer_step(loss, parts, optimizer, scheduler, model.parameters(), tcfg["grad_clip"], running, bar)
        done = step + 1
        if D.is_main() and (done % int(tcfg["log_every"]) == 0 or done == steps):
            rec = {"step": done, "time_s": round(time.time() - t0, 1), "lr": scheduler.get_last_lr()[0],
                   **{k: round(v, 4) for k, v in running.items()}}
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if bar is None and not quiet:
                log.info("step %s %s", done, rec)
        if done % int(tcfg["checkpoint_every"]) == 0 or done == steps:
            if D.is_main():
                model.config.training = _provenance(cfg, config_path, done, world)
                _save_training_state(out, model, optimizer, scheduler, done, cfg)
            D.barrier()
        if val_ds is not None and int(tcfg["eval_every"]) > 0 and (done % int(tcfg["eval_every"]) == 0 or done == steps):
            res = summarize(collect_predictions(model, val_ds), model.config.calibration_temperature)
            brief = {k: round(v, 4) for k, v in res.items() if isinstance(v, float)}
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps({"step": done, "val": brief}) + "\n")
            if bar is not None:
                bar.write(f"step {done} held-out: {brief}")
            model.train()
    if bar is not None:
        bar.close()
    D.barrier()
    if D.is_main():
        model.config.training = _provenance(cfg, config_path, steps, world)
        final = model.save_pretrained(out / "final")
        if "calib" in manifests:
            calibrate(final, manifests["calib"], device="cpu" if device.type == "cpu" else None)
        if cfg.get("export"):
            dest = Path(cfg["export"])
            dest = dest if dest.is_absolute() else base / dest
            m2 = GroundedCTModel.from_pretrained(out / "final", device="cpu")
            m2.save_pretrained(dest)
            log.info("exported model to %s", dest)
    D.cleanup()
    return out / "final"


def _provenance(cfg, config_path, steps, world) -> dict:
    return {"config_file": str(config_path) if config_path else None, "steps": steps,
            "world_size": world, "seed": cfg.get("train", {}).get("seed", 0),
            "data": {k: v for k, v in cfg.get("data", {}).items()},
            "losses": {**DEFAULT_LOSSES, **cfg.get("losses", {})},
            "phases": cfg.get("phases", []), "torch": torch.__version__}


@torch.no_grad()
def choose_anatomy_source(model: GroundedCTModel, dataset: ManifestDataset) -> dict:
    """Per anatomy, mean Dice (model grid) of the seg head and of the text-conditioned mask head
    on ``dataset``; sets ``config.seg_anatomies`` to those where the seg head is at least as good.
    Returns {anatomy: [seg Dice, mask-head Dice, n cases]}."""
    model.eval()
    A = model.config.anatomies
    ta = model.embed_text([canonical_phrase(a) for a in A])
    scores = {a: [[], []] for a in A}
    model.config.seg_anatomies = None
    st = model.config.feature_stride
    for n in range(len(dataset)):
        s = dataset.sample(n)
        dense = encode_sample(model, s)[1]
        both = [model.anatomy_mask_logits(dense, A, ta)[0], model.mask_logits(dense, ta)[0]]
        gt = s["anat_full"].numpy()
        for k, lg in enumerate(both):
            if st != 1:
                lg = F.interpolate(lg[None], scale_factor=st, mode="trilinear", align_corners=False)[0]
            for i, a in enumerate(A):
                if gt[i].any():
                    scores[a][k].append(dice((lg[i] > 0).numpy(), gt[i]))
    out = {a: [float(np.mean(v[0])) if v[0] else float("nan"), float(np.mean(v[1])) if v[1] else float("nan"),
               len(v[0])] for a, v in scores.items()}
    has = {a for a in A if members(a, model.config.seg_classes)}
    model.config.seg_anatomies = [a for a in A if a in has and not (out[a][0] < out[a][1])]
    return out


def calibrate(model_dir: Path, manifest: Path, device=None) -> dict:
    """Fit the temperature on a calibration split and rewrite the model folder's config.json
    (with a seg head, first choose each anatomy's mask source on the same split)."""
    model = GroundedCTModel.from_pretrained(model_dir, device=device)
    ds = ManifestDataset(manifest, model.config.spec, model.config.anatomies,
                         feature_stride=model.config.feature_stride)
    source = choose_anatomy_source(model, ds) if model.seg_head is not None else None
    pred = collect_predictions(model, ds)
    zc, yc, names = case_level(pred["logits"], pred["labels"], pred["items"])
    T, bias = fit_platt(zc, yc, names)
    before = summarize(pred, 1.0)
    T_only = fit_temperature(zc, yc)
    after_t = summarize(pred, T_only)
    after = summarize(pred, T, bias)
    model.config.calibration_temperature = T
    model.config.calibration_bias = bias
    model.config.calibration = {
        "method": "p = sigmoid(logit / T + b[finding]): shared temperature and per-finding offsets "
                  "(L2-regularised logistic regression, C=1) on the case-level organ prompt-ensemble "
                  "logit (max over sides for sided findings, as the engine reports unsided prompts)",
        "manifest": str(manifest), "n_cases": int(pred["labels"].shape[0]),
        "n_case_finding_pairs": int(yc.size), "ece_uncalibrated": before["ece"],
        "ece_temperature_only": after_t["ece"], "temperature_only": T_only,
        "ece_after": after["ece"], "auc": after["mean_finding_auc"],
    }
    if source is not None:
        model.config.calibration["anatomy_source"] = {
            "rule": "seg head where its mean Dice on this split is >= the mask head's, else the mask head",
            "dice_seg_head_mask_head_n": source}
    model.save_pretrained(model_dir)
    log.info("calibration T=%.3f, offsets fitted (ECE %.4f -> %.4f; temperature only %.4f)",
             T, before["ece"], after["ece"], after_t["ece"])
    return model.config.calibration

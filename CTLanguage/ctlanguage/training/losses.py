"""Training losses (each switchable in the training config).

* seg_loss                Dice + BCE of the text-conditioned mask head (organ and finding phrases)
* multiclass_seg_loss     softmax CE + Dice of the stage-1 segmentation head (label-map classes)
* organ_contrastive_loss  organ embedding <-> per-anatomy report sentence (fVLM / CT-GLIP), with
                          optional false-negative calibration (normal-normal and identical-text
                          pairs are positives, row-normalised soft targets) and optional extra
                          text negatives from an abnormality dictionary (CT-GLIP)
* presence_loss           BCE of the zero-shot prompt-ensemble score (the inference rule) against
                          report-derived labels
* consistency_loss        negative-free consistency between two augmented views (GTGM / SimSiam)
* global_clip_loss        whole image <-> whole report InfoNCE (the baseline)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def seg_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
             dice_weight: float = 1.0, bce_weight: float = 1.0, max_pos_weight: float = 10.0) -> torch.Tensor:
    """logits/target [B,N,...] -> Dice + class-balanced BCE.

    * BCE: foreground voxels of each (b, n) are up-weighted by min(n_bg / n_fg, max_pos_weight),
      so sparse organ/lesion masks cannot collapse to "predict nothing".
    * Dice: soft Dice per (b, n), averaged over pairs whose target is not empty (an empty
      target is handled by the BCE term alone)."""
    logits = logits.float().flatten(2)
    t = target.float().flatten(2)
    n_fg = t.sum(-1, keepdim=True)
    n_bg = t.shape[-1] - n_fg
    pos_w = (n_bg / n_fg.clamp_min(1.0)).clamp(1.0, max_pos_weight)
    w = 1.0 + (pos_w - 1.0) * t
    bce = (F.binary_cross_entropy_with_logits(logits, t, reduction="none") * w).sum(-1) / w.sum(-1)
    p = torch.sigmoid(logits)
    inter = (p * t).sum(-1)
    denom = p.sum(-1) + t.sum(-1)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    has = (n_fg[..., 0] > 0.5).float()
    dice_term = (dice * has).sum() / has.sum().clamp_min(1.0)
    return dice_weight * dice_term + bce_weight * bce.mean()


def multiclass_seg_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """logits [B,K+1,...], target [B,K+1,...] class fractions per voxel (class 0 background; all
    zero where the voxel is ignored) -> soft-label CE + soft Dice averaged over the (case,
    foreground class) pairs present in the target."""
    logits, t = logits.float().flatten(2), target.float().flatten(2)
    w = t.sum(1)                                           # [B,P] 1 where labelled, 0 ignored
    ce = -(t * F.log_softmax(logits, dim=1)).sum(1).sum() / w.sum().clamp_min(1.0)
    p = torch.softmax(logits, dim=1) * w[:, None]
    inter = (p * t).sum(-1)[:, 1:]
    denom = (p.sum(-1) + t.sum(-1))[:, 1:]
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    has = (t.sum(-1)[:, 1:] > 0.5).float()
    return ce + (dice * has).sum() / has.sum().clamp_min(1.0)


def soft_target_matrix(text_ids, normal, anatomy, fn_calibration: bool) -> torch.Tensor:
    """[M,M] 0/1 positives: the diagonal, plus (with false-negative calibration) every pair with
    identical text or two normal findings of the same anatomy."""
    M = len(text_ids)
    T = torch.eye(M)
    if fn_calibration:
        for i in range(M):
            for j in range(M):
                if text_ids[i] == text_ids[j] or (normal[i] and normal[j] and anatomy[i] == anatomy[j]):
                    T[i, j] = 1.0
    return T


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    targets = targets / targets.sum(-1, keepdim=True).clamp_min(1e-8)
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def organ_contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                           text_ids, normal, anatomy, fn_calibration: bool = True,
                           extra_txt: torch.Tensor | None = None,
                           extra_valid: torch.Tensor | None = None) -> torch.Tensor:
    """img/txt [M,E] (L2-normalised) pairs (organ embedding, that organ's report sentence).

    extra_txt [K,E]: abnormality-dictionary sentences; extra_valid [M,K] bool says which are true
    negatives for each image row (i.e. describe an abnormality absent from that organ)."""
    T = soft_target_matrix(text_ids, normal, anatomy, fn_calibration).to(img.device)
    S = scale * img @ txt.t()
    if extra_txt is not None and extra_txt.shape[0] > 0:
        E = scale * img @ extra_txt.t()
        E = E.masked_fill(~extra_valid.to(img.device), -1e4)
        logits_i2t = torch.cat([S, E], dim=1)
        targets_i2t = torch.cat([T, torch.zeros_like(E)], dim=1)
    else:
        logits_i2t, targets_i2t = S, T
    return 0.5 * (_soft_ce(logits_i2t, targets_i2t) + _soft_ce(S.t(), T.t()))


def presence_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float | None = None) -> torch.Tensor:
    pw = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pw)


def consistency_loss(p1: torch.Tensor, z1: torch.Tensor, p2: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Negative-free symmetric loss: predictions p_v against stop-gradient targets z_(other view)."""
    c1 = F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
    c2 = F.cosine_similarity(p2, z1.detach(), dim=-1).mean()
    return 2.0 - c1 - c2


def global_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                     extra_txt: torch.Tensor | None = None) -> torch.Tensor:
    """Whole image [B,E] <-> whole report [B,E] InfoNCE; extra_txt [K,E] = other reports."""
    S = scale * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    i2t = S if extra_txt is None else torch.cat([S, scale * img @ extra_txt.t()], dim=1)
    return 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(S.t(), labels))

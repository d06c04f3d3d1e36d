"""Stage-1 segmentation head on the dense features (ModelConfig.seg_classes / seg_findings).

Two 1x1x1 outputs on the feature grid: softmax logits over background + the label-map structures
(mutually exclusive, like the label map itself) and independent sigmoid logits per finding x side.
An anatomy of the vocabulary is the sum of the probabilities of the classes that make it up
(``members``): itself, the lobes of a lung, or every class for ``body``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import Pointwise3d

_SIDES = ("left", "right")


def members(anatomy: str, seg_classes: list) -> list[int]:
    """Class indices (1-based: 0 is background) that make up ``anatomy``; [] when the head has
    none. The same rule as training.dataset.anatomy_masks builds the targets with."""
    if anatomy == "body":
        return list(range(1, len(seg_classes) + 1))
    if anatomy in seg_classes:
        return [seg_classes.index(anatomy) + 1]
    if anatomy in ("lung_left", "lung_right"):
        side = anatomy.split("_")[1]
        return [i + 1 for i, c in enumerate(seg_classes)
                if c.startswith("lung_") and "lobe" in c and c.endswith(side)]
    return []


class SegHead(nn.Module):
    """``kernel`` 1: the v3 stage-1 head (a 1x1x1 trunk); 3: a 3x3x3 convolution of ``hidden``
    channels first, so a voxel sees its neighbours (trained in stage 2 on cached features)."""

    def __init__(self, channels: int, n_classes: int, n_findings: int, kernel: int = 1, hidden: int = 0):
        super().__init__()
        if kernel == 1:
            self.trunk = nn.Sequential(Pointwise3d(channels, channels), nn.PReLU())
        else:
            hidden = hidden or 2 * channels
            self.trunk = nn.Sequential(nn.Conv3d(channels, hidden, kernel, padding=kernel // 2), nn.PReLU(),
                                       Pointwise3d(hidden, channels), nn.PReLU())
        self.classes = Pointwise3d(channels, n_classes + 1)
        self.findings = Pointwise3d(channels, n_findings) if n_findings else None
        if self.findings is not None:
            with torch.no_grad():
                self.findings.bias.fill_(-4.0)   # findings are rare: start near "absent"

    def forward(self, dense: torch.Tensor):
        """dense [B,C,d,h,w] -> (class logits [B,K+1,d,h,w], finding logits [B,F,d,h,w] or None)."""
        h = self.trunk(dense)
        return self.classes(h), (self.findings(h) if self.findings is not None else None)


def anatomy_logits(class_logits: torch.Tensor, anatomies: list, seg_classes: list,
                   eps: float = 1e-6) -> tuple[torch.Tensor, list[bool]]:
    """[..., K+1,d,h,w] class logits -> ([..., A,d,h,w] binary logits log(p / (1 - p)) of each
    anatomy's summed class probability, [A] whether the head has the anatomy at all)."""
    p = torch.softmax(class_logits.float(), dim=-4)
    out, has = [], []
    for a in anatomies:
        idx = members(a, seg_classes)
        has.append(bool(idx))
        q = p[..., idx, :, :, :].sum(-4) if idx else torch.zeros_like(p[..., 0, :, :, :])
        q = q.clamp(eps, 1 - eps)
        out.append(torch.log(q) - torch.log1p(-q))
    return torch.stack(out, dim=-4), has

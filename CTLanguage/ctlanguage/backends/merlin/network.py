"""The whole Merlin network: image encoder, text encoder and the (unused at inference)
contrastive temperature, under our parameter names (``image.*``, ``text.*``, ``logit_scale``)."""

from __future__ import annotations

import torch
from torch import nn

from .model import I3ResNet152
from .text import MerlinText


class MerlinNet(nn.Module):
    def __init__(self, text_config: dict):
        super().__init__()
        self.image = I3ResNet152(heads=True)
        self.text = MerlinText(text_config)
        self.logit_scale = nn.Parameter(torch.ones([]))

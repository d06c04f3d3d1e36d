"""GroundedCTModel: image encoder + frozen text encoder/projection + mask head + organ pooling."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .heads import DynamicMaskHead, OrganAttentionPool, TextProjection
from .image_encoder import ImageEncoder, ImageFeatures
from .seg_head import SegHead, anatomy_logits
from .text_encoder import FrozenTextEncoder


class GroundedCTModel(nn.Module):
    """See docs/architecture.md "Model API" and docs/model.md."""

    def __init__(self, config: ModelConfig | None = None, text_encoder: FrozenTextEncoder | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        config.validate()
        self.image_encoder = ImageEncoder(
            in_channels=config.in_channels, channels=config.encoder_channels,
            dense_channels=config.dense_channels, embed_dim=config.embed_dim,
            coord_channels=config.coord_channels, feature_stride=config.feature_stride,
            fine_channels=config.fine_channels, coord_mode=config.coord_mode,
        )
        # stage-1 multi-class segmentation head (absent in v1/v2 checkpoints)
        self.seg_head = SegHead(config.dense_channels, len(config.seg_classes), len(config.seg_findings),
                                config.seg_head_kernel, config.seg_head_hidden) if config.seg_classes else None
        self.text_projection = TextProjection(config.text_dim, config.embed_dim)
        self.mask_head = DynamicMaskHead(config.embed_dim, config.dense_channels, config.mask_head_hidden)
        self.organ_pool = OrganAttentionPool(len(config.anatomies), config.dense_channels,
                                             config.pool_dim, config.embed_dim)
        # training-only predictor of the negative-free view-consistency loss (GTGM / SimSiam)
        self.consistency_predictor = nn.Sequential(
            nn.Linear(config.embed_dim, config.embed_dim), nn.GELU(),
            nn.Linear(config.embed_dim, config.embed_dim))
        # CLIP-style learnable temperature (stored as log of the scale), clamped in use
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        # the frozen LM is deliberately not a sub-module: it is never saved in our checkpoint
        self._text = text_encoder or FrozenTextEncoder(config.text_encoder, config.text_max_length,
                                                       expected_dim=config.text_dim)

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.log_logit_scale.device

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.config.logit_scale_max)

    @property
    def text_encoder(self) -> FrozenTextEncoder:
        return self._text

    def anatomy_index(self, key: str) -> int:
        return self.config.anatomies.index(key)

    # ---- API ---------------------------------------------------------------------------------
    def encode_image(self, x: torch.Tensor) -> ImageFeatures:
        """x: [B,1,D,H,W] in [0,1] on the model grid (D,H,W multiples of 16)."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"encode_image expects [B,1,D,H,W], got {tuple(x.shape)}")
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"model-grid sizes must be multiples of 16, got {tuple(x.shape[2:])}")
        return self.image_encoder(x.to(self.device))

    def text_base(self, texts: list[str]) -> torch.Tensor:
        """Frozen LM embeddings [N, text_dim] (cached per string)."""
        return self._text.encode(list(texts)).to(self.device)

    def embed_text(self, texts) -> torch.Tensor:
        """[N, E] L2-normalised joint-space embeddings of the given strings."""
        if isinstance(texts, str):
            texts = [texts]
        return self.text_projection(self.text_base(texts))

    def mask_logits(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B,N,d,h,w] mask logits on the feature grid for N prompt embeddings [N,E]."""
        return self.mask_head(dense, text.to(dense.dtype))

    def seg_logits(self, dense: torch.Tensor):
        """(class logits [B,K+1,d,h,w], finding logits [B,F,d,h,w] or None) of the seg head."""
        if self.seg_head is None:
            raise ValueError("this model has no segmentation head (config.seg_classes is empty)")
        return self.seg_head(dense)

    def anatomy_mask_logits(self, dense: torch.Tensor, anatomies: list, text: torch.Tensor) -> torch.Tensor:
        """[B,A,d,h,w] mask logits of the anatomies: from the seg head where it has the anatomy,
        else from the dynamic mask head driven by ``text`` [A,E] (the canonical phrases)."""
        if self.seg_head is None:
            return self.mask_logits(dense, text)
        lg, has = anatomy_logits(self.seg_head(dense)[0], list(anatomies), self.config.seg_classes)
        chosen = self.config.seg_anatomies
        if chosen is not None:
            has = [h and a in chosen for h, a in zip(has, anatomies)]
        if not all(has):
            miss = [i for i, h in enumerate(has) if not h]
            lg[:, miss] = self.mask_logits(dense, text[miss]).float()
        return lg

    def finding_channels(self, items) -> list:
        """Seg-head finding channel of each (finding, side) item, or None where it has none."""
        keys = [tuple(f) for f in self.config.seg_findings]
        return [keys.index((f, s)) if (f, s) in keys else None for f, s in items]

    def organ_embeddings(self, dense: torch.Tensor, masks: torch.Tensor, anatomies=None) -> torch.Tensor:
        """masks [B,A,d,h,w] in [0,1] (A = len(config.anatomies), or len(anatomies) when the
        anatomy keys are given) -> [B,A,E] L2-normalised organ-grounded embeddings."""
        index = None if anatomies is None else [self.anatomy_index(a) for a in anatomies]
        return self.organ_pool(dense, masks.to(dense.dtype), index)

    def presence_logit(self, organ_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Ensemble score (config.presence_rule):
        "difference": scale * (mean cos(organ, positive phrasings) - mean cos(organ, negated));
        "direction":  scale * cos(organ, mean(positive) - mean(negated)).

        organ_emb [..., E]; pos [P, E]; neg [Q, E] -> [...] (uncalibrated logit).
        With presence_source == "global" pass the global embedding instead of an organ one."""
        if self.config.presence_rule == "direction":
            d = F.normalize(pos.mean(0) - neg.mean(0), dim=-1)
            return self.logit_scale * (organ_emb @ d)
        s_pos = (organ_emb @ pos.t()).mean(-1)
        s_neg = (organ_emb @ neg.t()).mean(-1)
        return self.logit_scale * (s_pos - s_neg)

    def calibrated_probability(self, logit: torch.Tensor | float, finding: str | None = None) -> torch.Tensor:
        """p = sigmoid(logit / T + b) with T = config.calibration_temperature and
        b = config.calibration_bias[finding] (else its "_default", else 0)."""
        logit = torch.as_tensor(logit, dtype=torch.float32).detach()
        bias = self.calibration_offset(finding)
        return torch.sigmoid(logit / float(self.config.calibration_temperature) + bias)

    def calibration_offset(self, finding: str | None = None) -> float:
        b = self.config.calibration_bias or {}
        return float(b.get(finding, b.get("_default", 0.0)) if finding is not None else b.get("_default", 0.0))

    # ---- checkpoint I/O ----------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    def save_pretrained(self, directory: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        from .checkpoint import save_pretrained

        return save_pretrained(self, directory, extra_files=extra_files)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None, verify: bool = True,
                        text_encoder: FrozenTextEncoder | None = None) -> "GroundedCTModel":
        from .checkpoint import load_pretrained

        return load_pretrained(cls, directory, device=device, verify=verify, text_encoder=text_encoder)

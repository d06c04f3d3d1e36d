"""3D image encoder: early-downsampling residual U-Net (MONAI blocks) with CoordConv channels.

Input  x: [B, 1, D, H, W] in [0, 1] on the RAS-aligned model grid (array axes S, A, R).
Output ImageFeatures(dense=[B, C, D/2, H/2, W/2], global_embedding=[B, E] (L2-normalised)).
The very first convolution has stride 2, so no full-resolution feature map is ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit


@dataclass
class ImageFeatures:
    dense: torch.Tensor             # [B, C, d, h, w] on the feature grid (model grid / 2)
    global_embedding: torch.Tensor  # [B, E], L2-normalised


def coordinate_channels(shape, device, dtype) -> torch.Tensor:
    """Normalised RAS coordinates in [-1, 1] as 3 channels (R, A, S) for a [D, H, W] grid.

    Model space is RAS-aligned (array axes [k, j, i] = S, A, R), so the index along W grows toward
    +R etc.; the channels let the network tell left from right (laterality)."""
    d, h, w = shape
    zs = torch.linspace(-1.0, 1.0, d, device=device, dtype=dtype)
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    z, y, x = torch.meshgrid(zs, ys, xs, indexing="ij")
    return torch.stack([x, y, z], dim=0)


class ImageEncoder(nn.Module):
    def __init__(self, in_channels: int = 4, channels=(16, 32, 48, 64), dense_channels: int = 32,
                 embed_dim: int = 128, coord_channels: bool = True):
        super().__init__()
        self.coord_channels = coord_channels
        ch = list(channels)
        self.stem = Convolution(3, in_channels, ch[0], strides=2, kernel_size=3,
                                act="PRELU", norm="INSTANCE")
        self.stem2 = ResidualUnit(3, ch[0], ch[0], strides=1, subunits=1, act="PRELU",
                                  norm="INSTANCE")
        self.down = nn.ModuleList(
            ResidualUnit(3, ch[i], ch[i + 1], strides=2, subunits=2, act="PRELU", norm="INSTANCE")
            for i in range(len(ch) - 1)
        )
        # decoder: from the bottleneck back to 1/2 resolution with skip connections
        self.up = nn.ModuleList()
        for i in range(len(ch) - 1, 0, -1):
            self.up.append(Convolution(3, ch[i] + ch[i - 1], ch[i - 1], kernel_size=3,
                                       act="PRELU", norm="INSTANCE"))
        self.dense_out = nn.Sequential(
            Convolution(3, ch[0], dense_channels, kernel_size=3, act="PRELU", norm="INSTANCE"),
            nn.Conv3d(dense_channels, dense_channels, kernel_size=1),
        )
        self.global_proj = nn.Sequential(
            nn.Linear(2 * ch[-1], 2 * ch[-1]), nn.GELU(), nn.Linear(2 * ch[-1], embed_dim)
        )
        self.bottleneck_channels = ch[-1]

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected an image tensor [B,1,D,H,W], got {tuple(x.shape)}")
        if self.coord_channels:
            coords = coordinate_channels(x.shape[2:], x.device, x.dtype)
            x = torch.cat([x, coords.unsqueeze(0).expand(x.shape[0], -1, -1, -1, -1)], dim=1)
        h = self.stem2(self.stem(x))
        skips = [h]
        for block in self.down:
            h = block(h)
            skips.append(h)
        bottleneck = h
        for i, block in enumerate(self.up):
            skip = skips[-2 - i]
            h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        dense = self.dense_out(h)
        pooled = torch.cat([bottleneck.mean(dim=(2, 3, 4)), bottleneck.amax(dim=(2, 3, 4))], dim=1)
        g = F.normalize(self.global_proj(pooled), dim=-1)
        return ImageFeatures(dense=dense, global_embedding=g)

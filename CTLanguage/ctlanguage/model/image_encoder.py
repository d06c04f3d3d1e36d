"""3D image encoder: early-downsampling residual U-Net (MONAI-equivalent blocks, see blocks.py)
with CoordConv channels.

Input  x: [B, 1, D, H, W] in [0, 1] on the RAS-aligned model grid (array axes S, A, R).
Output ImageFeatures(dense=[B, C, D/s, H/s, W/s], global_embedding=[B, E] (L2-normalised)),
s = feature_stride. The very first convolution has stride 2; with feature_stride=1 a thin
full-resolution branch (``fine_channels`` wide, two convolutions on the input) is fused with the
upsampled decoder output, so only a few channels ever live at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import Convolution, ResidualUnit


@dataclass
class ImageFeatures:
    dense: torch.Tensor             # [B, C, d, h, w] on the feature grid (model grid / stride)
    global_embedding: torch.Tensor  # [B, E], L2-normalised


def coordinate_channels(shape, device, dtype, mode: str = "crop") -> torch.Tensor:
    """Normalised RAS coordinates in [-1, 1] as 3 channels (R, A, S) for a [D, H, W] grid
    (``mode`` "inplane": the S channel is zero).

    Model space is RAS-aligned (array axes [k, j, i] = S, A, R), so the index along W grows toward
    +R etc.; the channels let the network tell left from right (laterality)."""
    d, h, w = shape
    zs = torch.linspace(-1.0, 1.0, d, device=device, dtype=dtype)
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    if mode == "inplane":
        zs = torch.zeros_like(zs)
    z, y, x = torch.meshgrid(zs, ys, xs, indexing="ij")
    return torch.stack([x, y, z], dim=0)


class ImageEncoder(nn.Module):
    def __init__(self, in_channels: int = 4, channels=(16, 32, 48, 64), dense_channels: int = 32,
                 embed_dim: int = 128, coord_channels: bool = True, feature_stride: int = 2,
                 fine_channels: int = 8, coord_mode: str = "crop"):
        super().__init__()
        self.coord_mode = coord_mode
        if feature_stride not in (1, 2):
            raise ValueError(f"feature_stride must be 1 or 2, got {feature_stride}")
        self.coord_channels = coord_channels
        self.feature_stride = feature_stride
        ch = list(channels)
        self.stem = Convolution(in_channels, ch[0], strides=2, kernel_size=3)
        self.stem2 = ResidualUnit(ch[0], ch[0], strides=1, subunits=1)
        self.down = nn.ModuleList(
            ResidualUnit(ch[i], ch[i + 1], strides=2, subunits=2)
            for i in range(len(ch) - 1)
        )
        # decoder: from the bottleneck back to 1/2 resolution with skip connections
        self.up = nn.ModuleList()
        for i in range(len(ch) - 1, 0, -1):
            self.up.append(Convolution(ch[i] + ch[i - 1], ch[i - 1], kernel_size=3))
        self.fine = None
        if feature_stride == 1:
            self.fine = nn.Sequential(
                Convolution(in_channels, fine_channels, kernel_size=3),
                Convolution(fine_channels, fine_channels, kernel_size=3),
            )
            # 1x1x1 only at full resolution: 3x3x3 convolutions of dense_channels there cost
            # ~10x the whole rest of the network on a CPU
            self.dense_out = nn.Sequential(
                nn.Conv3d(ch[0] + fine_channels, dense_channels, kernel_size=1), nn.PReLU(),
                nn.Conv3d(dense_channels, dense_channels, kernel_size=1),
            )
        else:
            self.dense_out = nn.Sequential(
                Convolution(ch[0], dense_channels, kernel_size=3),
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
            coords = coordinate_channels(x.shape[2:], x.device, x.dtype, self.coord_mode)
            x = torch.cat([x, coords.unsqueeze(0).expand(x.shape[0], -1, -1, -1, -1)], dim=1)
        full = x
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
        if self.fine is not None:
            h = F.interpolate(h, size=full.shape[2:], mode="trilinear", align_corners=False)
            h = torch.cat([h, self.fine(full)], dim=1)
        dense = self.dense_out(h)
        pooled = torch.cat([bottleneck.mean(dim=(2, 3, 4)), bottleneck.amax(dim=(2, 3, 4))], dim=1)
        g = F.normalize(self.global_proj(pooled), dim=-1)
        return ImageFeatures(dense=dense, global_embedding=g)

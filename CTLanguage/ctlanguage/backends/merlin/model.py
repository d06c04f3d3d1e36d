"""Merlin's image encoder: an I3ResNet-152 (a ResNet-152 with 3D kernels) and its two heads.

Built directly in 3D, with no 2D network to inflate and nothing downloaded. Parameter names and
shapes equal the published checkpoint's ``encode_image.i3_resnet.*`` (minus that prefix), so the
weights load by name; ``weights.py`` maps the prefixes.

Layout facts (from the merlin-vlm 0.0.7 code, checked by Testing/test_merlin_parity.py):
input ``(B, 1, X, Y, Z)`` on a RAS grid is permuted to ``(B, 1, Z, X, Y)`` and the channel repeated
three times; stem conv 3x7x7 stride (1, 2, 2); max-pool 3x3x3 stride 2; bottleneck blocks
[3, 8, 36, 3] whose middle conv is 3x3x3 and carries the stride in all three axes; the 1x1x1 conv
heads act on the globally averaged 2048-d feature (``contrastive_head`` -> 512-d embedding,
``classifier`` -> 1692 phenotype logits).
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKS = (3, 8, 36, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
FEATURES = 2048
EMBED_DIM = 512
PHENOTYPES = 1692
HEADS = ("contrastive_head", "classifier")
# voxels of the (Z, X, Y) input per voxel of the last feature map
STRIDE_ZXY = (16, 32, 32)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * EXPANSION
        self.conv1 = nn.Conv3d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class I3ResNet152(nn.Module):
    """Backbone + heads. ``heads=False`` builds the backbone alone (e.g. for a backbone-only
    checkpoint); :meth:`forward` then returns only the pooled features and the feature map."""

    def __init__(self, heads: bool = True):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        cin = 64
        for i, (n, width) in enumerate(zip(BLOCKS, WIDTHS)):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * EXPANSION
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.has_heads = heads
        if heads:
            self.classifier = nn.Conv3d(FEATURES, PHENOTYPES, 1)
            self.contrastive_head = nn.Conv3d(FEATURES, EMBED_DIM, 1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) in [0, 1] -> layer4 features (B, 2048, Z/16, X/32, Y/32)."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected input (B, 1, X, Y, Z), got {tuple(x.shape)}")
        x = x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward(self, x: torch.Tensor) -> dict:
        """Returns ``features`` (B, 2048) and ``feature_map``; with heads also ``embedding``
        (B, 512, not normalised) and ``phenotype_logits`` (B, 1692)."""
        fmap = self.feature_map(x)
        pooled = fmap.mean(dim=(2, 3, 4), keepdim=True)
        out = {"features": pooled.flatten(1), "feature_map": fmap}
        if self.has_heads:
            out["embedding"] = self.contrastive_head(pooled).flatten(1)
            out["phenotype_logits"] = self.classifier(pooled).flatten(1)
        return out

    def embedding_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """The contrastive head applied voxel-wise to a feature map (its mean over voxels is the
        image embedding, the head being linear): (B, 512, Z', X', Y')."""
        if not self.has_heads:
            raise ValueError("this encoder was built without heads")
        return self.contrastive_head(fmap)

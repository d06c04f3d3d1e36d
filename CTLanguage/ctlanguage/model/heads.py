"""Heads: text projection, text-conditioned dynamic mask head, organ attention pooling."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import Pointwise3d


class TextProjection(nn.Module):
    """Trainable map from the frozen LM space to the joint space E (L2-normalised output)."""

    def __init__(self, text_dim: int, embed_dim: int, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.skip = nn.Linear(text_dim, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return F.normalize(self.mlp(x) + self.skip(x), dim=-1)


class DynamicMaskHead(nn.Module):
    """Text-conditioned mask head: a dynamic 1x1x1 convolution whose weights and bias are
    generated from the prompt embedding, applied to a shared per-voxel embedding of the dense
    features (MaskFormer / CLIP-driven-Universal style):

        logits[b, n, p] = <W(t_n), phi(f_b[p])> / sqrt(K) + b(t_n)

    phi is a shared 1x1x1 MLP (C -> K); W, b come from an MLP over the prompt embedding t_n.
    Memory stays O(B*K*P + B*N*P), so dozens of prompts per pass are cheap on a CPU."""

    def __init__(self, embed_dim: int, channels: int, hidden: int = 64):
        super().__init__()
        self.k = hidden
        self.phi = nn.Sequential(Pointwise3d(channels, hidden), nn.GELU(), Pointwise3d(hidden, hidden))
        self.generator = nn.Sequential(nn.Linear(embed_dim, 256), nn.GELU(), nn.Linear(256, hidden + 1))
        with torch.no_grad():
            self.generator[-1].bias.zero_()
            self.generator[-1].bias[-1] = -2.0   # start with sparse masks

    def forward(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        B, C, d, h, w = dense.shape
        p = self.generator(text)                     # [N, K+1]
        wgt, bias = p[:, : self.k], p[:, self.k]
        emb = self.phi(dense).flatten(2)             # [B, K, P]
        out = torch.einsum("bkp,nk->bnp", emb, wgt) / math.sqrt(self.k) + bias.view(1, -1, 1)
        return out.view(B, -1, d, h, w)

    # inference on one volume: the text-independent part once, then one [N,K]x[K,P] per prompt
    def voxel_embedding(self, dense: torch.Tensor) -> torch.Tensor:
        """phi of one volume's dense features [C,d,h,w] -> [K, P] (cache it per volume)."""
        return self.phi(dense[None]).flatten(2)[0]

    def logits_from_embedding(self, emb: torch.Tensor, text: torch.Tensor, spatial) -> torch.Tensor:
        """``forward`` for one volume from its :meth:`voxel_embedding`: [N, *spatial] logits."""
        p = self.generator(text.to(emb.dtype))                     # [N, K+1]
        k = self.k
        out = torch.addmm(p[:, k:k + 1], p[:, :k], emb, alpha=1.0 / math.sqrt(k))
        return out.reshape((text.shape[0],) + tuple(spatial))


class OrganAttentionPool(nn.Module):
    """Learned-query attention pooling of dense features inside each anatomy mask, followed by a
    per-anatomy linear projection into the joint space (fVLM)."""

    def __init__(self, n_anatomies: int, channels: int, pool_dim: int, embed_dim: int):
        super().__init__()
        self.key = Pointwise3d(channels, pool_dim)
        self.value = Pointwise3d(channels, pool_dim)
        self.query = nn.Parameter(torch.randn(n_anatomies, pool_dim) / math.sqrt(pool_dim))
        self.norm = nn.LayerNorm(2 * pool_dim)
        self.proj_w = nn.Parameter(torch.randn(n_anatomies, 2 * pool_dim, embed_dim)
                                   / math.sqrt(2 * pool_dim))
        self.proj_b = nn.Parameter(torch.zeros(n_anatomies, embed_dim))
        self.scale = 1.0 / math.sqrt(pool_dim)

    def forward(self, dense: torch.Tensor, masks: torch.Tensor, index=None) -> torch.Tensor:
        """dense [B,C,d,h,w], masks [B,A,d,h,w] in [0,1] -> [B,A,E] (L2-normalised).

        ``index`` (list of anatomy indices, length A) selects queries/projections when only some
        anatomies are pooled; default: all, in config order."""
        B = dense.shape[0]
        k = self.key(dense).flatten(2)            # [B,K,P]
        v = self.value(dense).flatten(2)          # [B,K,P]
        m = masks.flatten(2).to(k.dtype)          # [B,A,P]
        A = m.shape[1]
        if index is None:
            if A != self.query.shape[0]:
                raise ValueError(f"expected {self.query.shape[0]} anatomy masks, got {A}")
            q, pw, pb = self.query, self.proj_w, self.proj_b
        else:
            idx = torch.as_tensor(index, device=k.device, dtype=torch.long)
            q, pw, pb = self.query[idx], self.proj_w[idx], self.proj_b[idx]
        scores = torch.einsum("ak,bkp->bap", q, k) * self.scale
        empty = m.sum(-1, keepdim=True) <= 1e-6   # absent anatomy -> attend over the whole image
        m_eff = torch.where(empty, torch.ones_like(m), m)
        scores = scores + torch.log(m_eff.clamp_min(1e-6))
        attn = torch.softmax(scores, dim=-1)
        pooled_attn = torch.einsum("bap,bkp->bak", attn, v)
        mean_w = m_eff / m_eff.sum(-1, keepdim=True)
        pooled_mean = torch.einsum("bap,bkp->bak", mean_w, v)
        z = self.norm(torch.cat([pooled_attn, pooled_mean], dim=-1))   # [B,A,2K]
        out = torch.einsum("bak,ake->bae", z, pw) + pb.unsqueeze(0)
        return F.normalize(out, dim=-1)

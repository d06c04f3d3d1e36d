"""fVLM's network under the published checkpoint's own parameter names: a 3D ViT-B image encoder
(``visual_encoder.*``), a BERT text encoder of CXR-BERT's shape (``text_encoder.*``), the text
projection (``text_proj``), one learned query token, attention pooling and projection per anatomy
(``query_tokens``, ``attention``, ``vision_projs.<i>``) and the contrastive temperature (``temp``).

Written from the published description and checkpoint layout (facts, not code):
- ViT: one conv patch embedding (kernel = stride = 16 x 16 x 32 voxels on a D x H x W input),
  learned position embeddings for the 112 x 256 x 352 input (7 x 16 x 11 patches), trilinearly
  resized (align_corners=False) for other inputs; pre-norm blocks (LayerNorm -> multi-head
  attention with biased qkv -> residual; LayerNorm -> Linear/GELU/Linear -> residual); final
  LayerNorm. The anatomy pooling reads the tokens after blocks 3, 6 and 9 (0-based) and after the
  final norm.
- An anatomy's embedding: its query token attends (4 heads) over the tokens of those four levels
  whose 16 x 16 x 32 patch touches the anatomy mask; its own linear projection to 256-d; L2 norm.
- Text: [CLS] of the BERT encoder (no token-type embedding is added) -> ``text_proj`` -> L2 norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ORGANS = ("lung", "heart", "esophagus", "aorta")   # order of query_tokens / vision_projs
PATCH = (16, 16, 32)            # D, H, W voxels per token
INPUT = (112, 256, 352)         # the input size the position embeddings were learned for
TAPS = (3, 6, 9)                # blocks whose outputs the anatomy pooling also reads
EMBED_DIM = 256
# ViT-B; tests build smaller ones (only the reference's pooling fixes width 768)
VIT_B = {"hidden": 768, "layers": 12, "heads": 12, "mlp": 3072, "pool_heads": 4}


class PatchEmbedding(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.grid = tuple(i // p for i, p in zip(INPUT, PATCH))
        self.patch_embeddings = nn.Conv3d(1, hidden, kernel_size=PATCH, stride=PATCH)
        n = self.grid[0] * self.grid[1] * self.grid[2]
        self.position_embeddings = nn.Parameter(torch.zeros(1, n, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(x)                       # (B, C, d, h, w)
        size = tuple(x.shape[2:])
        tokens = x.flatten(2).transpose(1, 2)
        pos = self.position_embeddings
        if size != self.grid:
            c = pos.shape[-1]
            pos = pos.transpose(1, 2).reshape(1, c, *self.grid)
            pos = F.interpolate(pos, size=size, mode="trilinear", align_corners=False)
            pos = pos.flatten(2).transpose(1, 2)
        return tokens + pos


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp: int):
        super().__init__()
        self.linear1 = nn.Linear(hidden, mlp)
        self.linear2 = nn.Linear(mlp, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = Mlp(hidden, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int, mlp: int):
        super().__init__()
        self.patch_embedding = PatchEmbedding(hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> list:
        """Token levels the pooling reads: outputs of the TAPS blocks, then the final norm."""
        x = self.patch_embedding(x)
        levels = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in TAPS:
                levels.append(x)
        levels.append(self.norm(x))
        return levels


def bert_config(text: dict):
    from transformers import BertConfig

    return BertConfig(**text)


class NoTokenTypes(nn.Module):
    """Stands in for BERT's token-type table: fVLM's text encoder adds no token-type embedding
    (it is called without token-type ids), so this adds zeros and holds no parameters."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.new_zeros((*ids.shape, self.hidden), dtype=torch.float32)


class FVLMNet(nn.Module):
    """``vision``: ViT sizes (:data:`VIT_B` keys); ``text``: BertConfig fields."""

    def __init__(self, vision: dict, text: dict, embed_dim: int = EMBED_DIM):
        super().__init__()
        from transformers import BertModel

        v = dict(VIT_B, **vision)
        self.visual_encoder = ViT3D(v["hidden"], v["layers"], v["heads"], v["mlp"])
        self.text_encoder = BertModel(bert_config(text), add_pooling_layer=False)
        self.text_encoder.embeddings.token_type_embeddings = NoTokenTypes(int(text["hidden_size"]))
        self.text_proj = nn.Linear(int(text["hidden_size"]), embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.attention = nn.MultiheadAttention(v["hidden"], v["pool_heads"], batch_first=True)
        self.vision_projs = nn.ModuleList(nn.Linear(v["hidden"], embed_dim) for _ in ORGANS)
        self.query_tokens = nn.Parameter(torch.zeros(len(ORGANS), v["hidden"]))

    def rebuild_buffers(self) -> None:
        """BERT's index buffers (not saved) after a load onto the meta device."""
        emb = self.text_encoder.embeddings
        n = emb.position_embeddings.num_embeddings
        for name, value in (("position_ids", torch.arange(n).expand((1, -1))),
                            ("token_type_ids", torch.zeros((1, n), dtype=torch.long))):
            if hasattr(emb, name):
                emb.register_buffer(name, value, persistent=False)

    def organ_embedding(self, image: torch.Tensor, mask: torch.Tensor, organ: int) -> torch.Tensor:
        """(256,) L2-normalised embedding of anatomy ``organ`` (index in ORGANS) from ``image``
        (1, 1, D, H, W; sides multiples of PATCH) and its boolean ``mask`` (D, H, W)."""
        levels = self.visual_encoder(image)
        flags = F.max_pool3d(mask[None, None].float(), PATCH, PATCH).flatten() > 0
        if not bool(flags.any()):
            raise ValueError("the anatomy mask covers no patch of the window")
        kv = torch.cat([lvl[0, flags] for lvl in levels])[None]
        pooled, _ = self.attention(self.query_tokens[organ][None, None], kv, kv, need_weights=False)
        return F.normalize(self.vision_projs[organ](pooled[0, 0]), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, 256) L2-normalised text embeddings of tokenised texts ([CLS] token)."""
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(out[:, 0]), dim=-1)

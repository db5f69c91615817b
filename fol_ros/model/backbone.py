"""DINOv2 ViT/14 backbone (register-free, LayerScale) as FoL uses it (fol-method §2).

Parameter names equal Meta's `DinoVisionTransformer` so that FoL checkpoints (`backbone.model.*`) and DINOv2
state dicts load strictly. Besides the usual forward, `FoLBackbone` returns the CLS->patch attention of the last
block, summed over heads and recomputed from that block's input (§2.4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 14
POS_GRID = 37            # DINOv2 was trained at 518 px: 37 x 37 position embeddings
INTERPOLATE_OFFSET = 0.1  # DINOv2's scale-factor "kludge" (§2.2); must be mirrored exactly
NUM_TRAINABLE_BLOCKS = 4


@dataclass(frozen=True)
class VitArch:
    """Size of one ViT/14 variant."""

    dim: int
    depth: int
    heads: int
    mlp_ratio: int = 4


ARCHS: dict[str, VitArch] = {
    'vits14': VitArch(384, 12, 6),
    'vitb14': VitArch(768, 12, 12),
    'vitl14': VitArch(1024, 24, 16),
    # Test-only architecture: same structure and heads, small enough for unit tests.
    'tiny': VitArch(64, 4, 2),
}


class PatchEmbed(nn.Module):
    """Conv2d(3, C, 14, stride 14); output flattened row-major to [B, P, C]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (scale head_dim^-0.5)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def split_qkv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, N, C] -> q, k, v each [B, heads, N, head_dim]."""
        b, n, c = y.shape
        qkv = self.qkv(y).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.split_qkv(y))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as DINOv2
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale (registration order = DINOv2's key order)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_with_cls_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block forward plus the CLS->patch attention of this block, summed over heads: [B, P].

        FoL recomputes softmax(q k^T * scale) from the block input; only the CLS query row is needed, and the
        qkv projection is shared with the block's own attention (same inputs, same values).
        """
        q, k, v = self.attn.split_qkv(self.norm1(x))
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * self.attn.scale      # [B, heads, 1, N]
        cls_att = logits.softmax(dim=-1)[:, :, 0, 1:].sum(dim=1)            # [B, P]
        x = x + self.ls1(self.attn.attend(q, k, v))
        return x + self.ls2(self.mlp(self.norm2(x))), cls_att


def interpolate_pos_embed(pos_embed: torch.Tensor, h0: int, w0: int) -> torch.Tensor:
    """DINOv2's position-embedding resampling for an h0 x w0 patch grid (fol-method §2.2), returned as [1, 1+h0*w0, C].

    The scale factors (h0 + 0.1) / 37 are passed as *scale_factor*, so PyTorch samples with that ratio while the
    output size floors to h0: reproducing this (not size=(h0, w0)) is what matches the official model.
    """
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if h0 * w0 == n and h0 == w0:
        return pos_embed
    dtype = pos_embed.dtype
    pe = pos_embed.float()
    dim = pe.shape[-1]
    grid = pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = (float(h0 + INTERPOLATE_OFFSET) / m, float(w0 + INTERPOLATE_OFFSET) / m)
    grid = F.interpolate(grid, scale_factor=scale, mode='bicubic', antialias=False)
    if tuple(grid.shape[-2:]) != (h0, w0):  # cannot happen for sane sizes; guards the floor() reasoning above
        raise RuntimeError(f'position-embedding grid {tuple(grid.shape[-2:])} != {(h0, w0)}')
    grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
    return torch.cat((pe[:, :1], grid), dim=1).to(dtype)


class DinoVisionTransformer(nn.Module):
    """The ViT itself; attribute names give Meta's state-dict keys (cls_token, pos_embed, mask_token, ...)."""

    def __init__(self, arch: VitArch) -> None:
        super().__init__()
        dim = arch.dim
        self.arch = arch
        self.embed_dim = dim
        self.num_heads = arch.heads
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + POS_GRID * POS_GRID, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused, kept for strict loading
        self.blocks = nn.ModuleList(Block(dim, arch.heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, CLS token and (interpolated) position embeddings: [B, 1+P, C]."""
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        return tokens + interpolate_pos_embed(self.pos_embed, h // PATCH, w // PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain transformer forward (final norm applied), [B, 1+P, C]; used as the benchmark baseline."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class FoLBackbone(nn.Module):
    """FoL's DINOv2 wrapper: returns patch map f [B,C,h,w], CLS token t [B,C] and attention A [B,P] (§2.4)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f'unknown backbone {name!r}; choose one of {", ".join(ARCHS)}')
        self.name = name
        self.model = DinoVisionTransformer(ARCHS[name])

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, _, h, w = img.shape
        return self.forward_trainable(self.frozen_tokens(img), h // PATCH, w // PATCH)

    def frozen_tokens(self, img: torch.Tensor) -> torch.Tensor:
        """Tokens [B, 1+P, C] entering the last 4 (trainable) blocks; they never carry gradients."""
        m = self.model
        # The frozen part never gets gradients in FoL (no_grad, then detach), whatever the caller's grad mode.
        with torch.no_grad():
            x = m.prepare_tokens(img)
            for blk in m.blocks[:len(m.blocks) - NUM_TRAINABLE_BLOCKS]:
                x = blk(x)
        return x.detach()

    def forward_trainable(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last 4 blocks (the last one also giving the CLS attention A) and the final norm, for an h x w grid."""
        m = self.model
        for blk in m.blocks[len(m.blocks) - NUM_TRAINABLE_BLOCKS:-1]:
            x = blk(x)
        x, att = m.blocks[-1].forward_with_cls_attention(x)
        x = m.norm(x)
        f = x[:, 1:].reshape(x.shape[0], h, w, m.embed_dim).permute(0, 3, 1, 2)
        return f, x[:, 0], att

"""FoL local branch: two transposed convolutions to a 128-d local grid, and token selection (fol-method §5).

The 225 selected patches are upsampled to the local grid H' x W' (= 4h-3 x 4w-3) with PyTorch's legacy 'nearest'
rule, src = floor(dst * float32(h / H')), evaluated in float32 as the official code does; every local cell whose
source patch is selected becomes a token, in row-major order.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOCAL_DIM = 128
MAX_TOKENS = 3600  # 225 patches x at most 4 x 4 local cells each


def local_grid_size(h: int, w: int) -> tuple[int, int]:
    """Local grid of an h x w patch grid: each stride-2 transposed conv maps n -> 2n - 1."""
    return 4 * h - 3, 4 * w - 3


def legacy_nearest_map(src: int, dst: int) -> np.ndarray:
    """Source index of each destination index for PyTorch's legacy 'nearest' resize, in float32 arithmetic."""
    if src == dst:
        return np.arange(dst, dtype=np.int64)
    scale = np.float32(src) / np.float32(dst)
    idx = np.floor(np.arange(dst, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, src - 1)


@functools.lru_cache(maxsize=32)
def local_cell_to_patch(h: int, w: int) -> np.ndarray:
    """[H'*W'] flat patch index (row-major on the h x w grid) of each local cell (row-major on H' x W')."""
    hp, wp = local_grid_size(h, w)
    rows = legacy_nearest_map(h, hp)
    cols = legacy_nearest_map(w, wp)
    out = (rows[:, None] * w + cols[None, :]).reshape(-1)
    out.flags.writeable = False   # cached: shared by every call
    return out


def local_features(upconv: nn.ConvTranspose2d, upconv2: nn.ConvTranspose2d, f: torch.Tensor) -> torch.Tensor:
    """upconv2(ReLU(upconv(f))) as [B, H', W', 128] (no activation after upconv2, not normalised)."""
    return upconv2(F.relu(upconv(f))).permute(0, 2, 3, 1)


def make_upconvs(dim: int) -> tuple[nn.ConvTranspose2d, nn.ConvTranspose2d]:
    """The two transposed convolutions (they live on FoLNet as `upconv`/`upconv2`, the checkpoint keys)."""
    return (nn.ConvTranspose2d(dim, 256, 3, stride=2, padding=1),
            nn.ConvTranspose2d(256, LOCAL_DIM, 3, stride=2, padding=1))


def select_tokens_dynamic(x0: torch.Tensor, selected: torch.Tensor, h: int, w: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official selection: binary patch mask, 'nearest' upsampling, boolean gather, zero padding to 3600.

    Args:
        x0: [B, H', W', 128] raw local features; selected: [B, 225] patch indices.
    Returns:
        local [B, 3600, 128] (unit rows, zero padding), count [B], local_index [B, 3600] (-1 padding), mask [B, h, w].
    """
    b, hp, wp, d = x0.shape
    mask = torch.zeros(b, h * w, dtype=x0.dtype, device=x0.device).scatter_(1, selected, 1.0).view(b, h, w)
    mask_up = F.interpolate(mask[:, None].float(), (hp, wp), mode='nearest')[:, 0].reshape(b, -1) > 0
    flat = x0.reshape(b, hp * wp, d)
    local = x0.new_zeros(b, MAX_TOKENS, d)
    index = torch.full((b, MAX_TOKENS), -1, dtype=torch.int64, device=x0.device)
    counts = mask_up.sum(dim=1)
    for i in range(b):
        idx = mask_up[i].nonzero()[:, 0]
        local[i, :idx.numel()] = flat[i, idx]
        index[i, :idx.numel()] = idx
    return F.normalize(local, dim=-1), counts, index, mask


def select_tokens_fixed(x0: torch.Tensor, selected: torch.Tensor, h: int, w: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Export-friendly selection with fixed shapes: same tokens and order as `select_tokens_dynamic`.

    The patch mask is gathered onto the local grid with a constant index map, and the valid cells are brought to
    the front in row-major order by a top-k on (valid * (N - position)), so no nonzero/split/pad is needed.
    Returns local [B, 3600, 128], local_index [B, 3600] int64 (-1 padding), valid [B, 3600] bool.
    """
    b, hp, wp, d = x0.shape
    n = hp * wp
    cell_patch = torch.tensor(local_cell_to_patch(h, w), device=x0.device)
    patch_mask = torch.zeros(b, h * w, dtype=x0.dtype, device=x0.device).scatter(1, selected, 1.0)
    cell_mask = patch_mask[:, cell_patch].float()                                # [B, N]
    position = torch.arange(n, 0, -1, device=x0.device, dtype=torch.float32)     # N .. 1 (exact in fp32 below 2^24)
    order = torch.topk(cell_mask * position, MAX_TOKENS, dim=1).indices          # valid cells first, row-major
    valid = torch.gather(cell_mask, 1, order) > 0
    flat = x0.reshape(b, n, d)
    local = torch.gather(flat, 1, order[:, :, None].expand(-1, -1, d))
    local = F.normalize(local, dim=-1) * valid[:, :, None].to(local.dtype)
    index = torch.where(valid, order, torch.full_like(order, -1))
    return local, index, valid

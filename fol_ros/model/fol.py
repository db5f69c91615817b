"""FoLNet: DINOv2 backbone + FoL aggregator + local branch, with the official state-dict layout (fol-method §5, §6).

Three forwards share the same computation:
  * `forward(x)`        dynamic, as the official evaluation (boolean token gather, padding to 3600);
  * `forward_fixed(x)`  fixed output shapes for ONNX/TensorRT (top-k gather + validity mask), same tokens and order;
  * `forward_train(x)`  the training outputs (selection by conf + imp, KL terms, loss inputs), shapes derived
                         from the input instead of FoL's hard-coded 322-px constants.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fol_ros.config import check_input_size
from fol_ros.errors import BadInputError, ConfigError
from fol_ros.model.aggregator import FoLAggregator
from fol_ros.model.backbone import ARCHS, PATCH, FoLBackbone
from fol_ros.model.local_head import (MAX_TOKENS, local_features, local_grid_size, make_upconvs,
                                      select_tokens_dynamic, select_tokens_fixed)

MASK_GUIDE_THRESHOLD = 0.01


@dataclass
class FoLOutput:
    """Official test-time outputs of a batch."""

    global_desc: torch.Tensor   # [B, 8448] unit norm
    local: torch.Tensor         # [B, 3600, 128] unit rows, zero padding
    local_count: torch.Tensor   # [B] number of valid local rows
    local_index: torch.Tensor   # [B, 3600] flat row-major index into the local grid, -1 padding
    mask: torch.Tensor          # [B, h, w] binary map of the 225 selected patches
    grid: tuple[int, int]       # (H', W') local grid


@dataclass
class TrainOutput:
    """What FoL's training losses consume (fol-method §5 returned 7-tuple, §10)."""

    g: torch.Tensor             # [B, 8448]
    local: torch.Tensor         # [B, 3600, 128] selected with mix = conf + imp (gradient flows)
    local_index: torch.Tensor   # [B, 3600]
    valid: torch.Tensor         # [B, 3600] bool
    kl1: torch.Tensor
    kl2: torch.Tensor
    local_sep: torch.Tensor     # [B, H', W', 128] normalised, detached
    mask_sep: torch.Tensor      # [B, H', W'] bilinear (align_corners) upsampling of mix
    f_norm: torch.Tensor        # [B, C, P] L2-normalised backbone patch features (dim 1)
    p: torch.Tensor             # [B, 64, P] Sinkhorn assignment
    local_all: torch.Tensor     # [B, H', W', 128] normalised, with gradient
    mask_guide: torch.Tensor    # [B, P]
    grid: tuple[int, int]


def check_image_batch(x: torch.Tensor) -> tuple[int, int]:
    """Validate a network input [B,3,H,W]; returns the patch grid (h, w)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise BadInputError(f'network input must be [B, 3, H, W], got {tuple(x.shape)}')
    try:
        hh, ww = check_input_size((x.shape[2], x.shape[3]))
    except ConfigError as exc:
        raise BadInputError(str(exc)) from None
    return hh // PATCH, ww // PATCH


class FoLNet(nn.Module):
    """FoL network. Keys: backbone.model.*, aggregator.*, upconv.*, upconv2.* (exactly the official layout).

    Args:
        backbone: 'vits14', 'vitb14', 'vitl14' (or 'tiny' for tests).
    """

    def __init__(self, backbone: str = 'vitb14') -> None:
        super().__init__()
        if backbone not in ARCHS:
            raise ConfigError(f'unknown backbone {backbone!r}; choose one of {", ".join(ARCHS)}')
        dim = ARCHS[backbone].dim
        self.backbone_name = backbone
        self.backbone = FoLBackbone(backbone)
        self.aggregator = FoLAggregator(dim)
        self.upconv, self.upconv2 = make_upconvs(dim)

    @property
    def embed_dim(self) -> int:
        return self.backbone.model.embed_dim

    def _common(self, x: torch.Tensor, test: bool):
        h, w = check_image_batch(x)
        f, t, att = self.backbone(x)
        mask_guide = torch.where(att >= MASK_GUIDE_THRESHOLD, att, torch.zeros_like(att))
        agg = self.aggregator(f, t, att, mask_guide, test=test)
        x0 = local_features(self.upconv, self.upconv2, f)
        return h, w, f, mask_guide, agg, x0

    def forward(self, x: torch.Tensor) -> FoLOutput:
        """Official test-time forward (test=True): global descriptor and the padded selected local tokens."""
        h, w, _, _, agg, x0 = self._common(x, test=True)
        local, count, index, mask = select_tokens_dynamic(x0, agg.selected, h, w)
        return FoLOutput(agg.global_desc, local, count, index, mask, local_grid_size(h, w))

    def forward_fixed(self, x: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Export-friendly forward with fixed shapes.

        Returns (global [B,8448], local [B,3600,128], local_index [B,3600] int64 (-1 pad), valid [B,3600] bool).
        """
        h, w, _, _, agg, x0 = self._common(x, test=True)
        local, index, valid = select_tokens_fixed(x0, agg.selected, h, w)
        return agg.global_desc, local, index, valid

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        """Training forward (test=False): selection by conf + imp, KL terms and the inputs of every FoL loss.

        Dropout is active only if the module is in train() mode.
        """
        h, w, f, mask_guide, agg, x0 = self._common(x, test=False)
        b = x.shape[0]
        hp, wp = local_grid_size(h, w)
        local, index, valid = select_tokens_fixed(x0, agg.selected, h, w)
        local_sep = F.normalize(x0.detach(), dim=-1)
        mask_sep = F.interpolate(agg.mix.view(b, 1, h, w), (hp, wp), mode='bilinear', align_corners=True)[:, 0]
        return TrainOutput(
            g=agg.global_desc, local=local, local_index=index, valid=valid, kl1=agg.kl1, kl2=agg.kl2,
            local_sep=local_sep, mask_sep=mask_sep, f_norm=F.normalize(f.reshape(b, f.shape[1], -1), dim=1),
            p=agg.p, local_all=F.normalize(x0, dim=-1), mask_guide=mask_guide, grid=(hp, wp))


__all__ = ['FoLNet', 'FoLOutput', 'TrainOutput', 'MAX_TOKENS', 'check_image_batch']

"""FoL aggregator: SALAD-style optimal-transport VLAD whose dustbin is driven by the attention mask (fol-method §4).

Symbols follow the paper: m = 64 clusters, l = 128 cluster dims, g = 256 token dims; P = h*w patches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLUSTERS = 64
CLUSTER_DIM = 128
TOKEN_DIM = 256
GLOBAL_DIM = TOKEN_DIM + NUM_CLUSTERS * CLUSTER_DIM  # 8448
SELECTED_PATCHES = 225
SINKHORN_ITERS = 3


def sinkhorn_with_dustbin(scores: torch.Tensor, dustbin: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """Log-space optimal transport with SuperGlue marginals; the dustbin row holds per-patch scores.

    Args:
        scores: [B, m, n] cluster scores.
        dustbin: [B, n] dustbin scores (FoL: 1 - mask_guide).
    Returns:
        p: [B, m, n] assignment probabilities (dustbin row dropped).
    """
    b, m, n = scores.shape
    couplings = torch.cat([scores, dustbin[:, None, :]], dim=1)
    norm = -torch.tensor(math.log(n + m), dtype=scores.dtype, device=scores.device)
    log_mu = torch.cat([norm.expand(m), (norm + math.log(n - m)).reshape(1)]).expand(b, -1)
    log_nu = norm.expand(n).expand(b, -1)
    u = torch.zeros_like(log_mu)
    v = torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v.unsqueeze(1), dim=2)
        v = log_nu - torch.logsumexp(couplings + u.unsqueeze(2), dim=1)
    log_p = couplings + u.unsqueeze(2) + v.unsqueeze(1) - norm
    return log_p.exp()[:, :-1]


def replace_top_values(x: torch.Tensor) -> torch.Tensor:
    """Out-of-place version of FoL's `replace_top_values`: the 3 largest entries of each row become the value at
    descending rank int(0.05 * P) (fol-method §4.2 step 5)."""
    rank = int(0.05 * x.shape[-1])
    top = torch.topk(x, max(rank + 1, 3), dim=-1)
    fill = top.values[:, rank:rank + 1].expand(-1, 3)
    return x.scatter(-1, top.indices[:, :3], fill)


@dataclass
class AggregatorOutput:
    """Everything the aggregator computes; `forward` of the network picks what it needs."""

    global_desc: torch.Tensor   # [B, 8448], unit norm
    p: torch.Tensor             # [B, 64, P] assignment
    conf: torch.Tensor          # [B, P] softmax(replace_top_values(p.mean(1)))
    imp: torch.Tensor | None    # [B, P] softmax(replace_top_values(A)); training only
    mix: torch.Tensor           # [B, P] selection score (conf at test, conf + imp in training)
    selected: torch.Tensor      # [B, 225] indices of the top-225 patches of mix
    kl1: torch.Tensor | None
    kl2: torch.Tensor | None


class FoLAggregator(nn.Module):
    """Token MLP, cluster MLP and score MLP over the DINOv2 features, Sinkhorn with the attention dustbin."""

    def __init__(self, dim: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.token_features = nn.Sequential(nn.Linear(dim, 512), nn.ReLU(), nn.Linear(512, TOKEN_DIM))
        # One Dropout instance shared by both branches, as in FoL (it has no parameters).
        self.dropout = nn.Dropout(dropout)
        self.cluster_features = nn.Sequential(
            nn.Conv2d(dim, 512, 1), self.dropout, nn.ReLU(), nn.Conv2d(512, CLUSTER_DIM, 1))
        self.score = nn.Sequential(
            nn.Conv2d(dim, 512, 1), self.dropout, nn.ReLU(), nn.Conv2d(512, NUM_CLUSTERS, 1))

    def forward(self, f: torch.Tensor, t: torch.Tensor, att: torch.Tensor, mask_guide: torch.Tensor,
                test: bool = True) -> AggregatorOutput:
        """Args: f [B,C,h,w] patch map, t [B,C] CLS token, att [B,P] raw attention, mask_guide [B,P]."""
        feats = self.cluster_features(f).flatten(2)            # [B, 128, P]
        scores = self.score(f).flatten(2)                       # [B, 64, P]
        token = self.token_features(t)                          # [B, 256]
        p = sinkhorn_with_dustbin(scores, 1 - mask_guide)
        conf = replace_top_values(p.mean(dim=1)).softmax(dim=-1)
        imp = kl1 = kl2 = None
        if test:
            mix = conf
        else:
            imp = replace_top_values(att).softmax(dim=-1)
            kl1 = F.kl_div(conf.log(), imp.detach(), reduction='none').sum(-1).mean()
            kl2 = F.kl_div(imp.log(), conf.detach(), reduction='none').sum(-1).mean()
            mix = conf + imp
        selected = torch.topk(mix, SELECTED_PATCHES, dim=-1).indices
        vlad = torch.einsum('bcp,bkp->bck', feats, p)           # [B, 128, 64]; flatten gives index c*64 + k
        desc = torch.cat([F.normalize(token, dim=-1), F.normalize(vlad, dim=1).flatten(1)], dim=-1)
        return AggregatorOutput(F.normalize(desc, dim=-1), p, conf, imp, mix, selected, kl1, kl2)

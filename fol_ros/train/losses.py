"""FoL's training objective (fol-method §10): L = L_MS + L_MNN + 5e-3·(kl1 + kl2) + L_CE + L_PC.

Every term is a pure function of tensors so that each can be checked against a hand-computed case. Labels are
place ids laid out place-major (K consecutive images per place). Grid sizes are derived from the tensors, never the
official hard-coded 529 / 23 / 89 (§14 #7), so any input size >= 294 px trains.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fol_ros.errors import ConfigError

log = logging.getLogger(__name__)

RERANK_THRESHOLD = 0.7      # cosine a mutual-NN pair must exceed (§9.2)
PC_ANCHOR_THRESHOLD = 0.1   # mask_guide value that makes a patch an L_PC anchor
PC_CANDIDATE_THRESHOLD = 0.1
PC_MIN_SIM = 0.8
PC_RATIO = 2.0
PC_MAX_PAIRS = 5
PC_SCALE = 1e-2


def _pml():
    """pytorch-metric-learning's losses/miners/distances (imported lazily: it takes ~1 s)."""
    try:
        from pytorch_metric_learning import distances, losses, miners
    except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
        raise ConfigError('training needs pytorch-metric-learning: '
                          '.venv/bin/python -m pip install --no-deps pytorch-metric-learning==2.9.0') from exc
    return distances, losses, miners


def multi_similarity_loss(g: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0, beta: float = 50.0,
                          base: float = 0.0, epsilon: float = 0.1) -> torch.Tensor:
    """L_MS: MultiSimilarityLoss(alpha, beta, base, dot product) on pairs from MultiSimilarityMiner(epsilon, cosine).

    g: [B, D] global descriptors (unit norm); labels: [B] place ids.
    """
    distances, losses, miners = _pml()
    miner = miners.MultiSimilarityMiner(epsilon=epsilon, distance=distances.CosineSimilarity())
    loss_fn = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base,
                                         distance=distances.DotProductSimilarity())
    g = g.float()
    return loss_fn(g, labels, miner(g, labels))


def batch_hard_triplets(g: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchHardMiner (L2 distance on normalised g): per anchor the farthest positive and the nearest negative."""
    _, _, miners = _pml()
    with torch.no_grad():
        a, p, n = miners.BatchHardMiner()(g.detach().float(), labels)
    return a, p, n


def _valid_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices of the non-padding (non-zero) rows of [L, D]."""
    return torch.nonzero(x.detach().abs().sum(-1) > 0)[:, 0]


@torch.no_grad()
def mutual_nn_pairs(query: torch.Tensor, db: torch.Tensor, threshold: float = RERANK_THRESHOLD
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (iq, idb) of the mutual-NN pairs with cosine > threshold (§9.2); zero padding rows are skipped
    (they can never form a pair above a positive threshold, so the pair set is unchanged)."""
    vq, vd = _valid_rows(query), _valid_rows(db)
    empty = torch.zeros(0, dtype=torch.long, device=query.device)
    if len(vq) == 0 or len(vd) == 0:
        return empty, empty
    sim = db[vd].float() @ query[vq].float().T                  # [Ld, Lq]
    best_db = sim.argmax(0)                                     # best db token of each query token
    best_q = sim.argmax(1)                                      # best query token of each db token
    iq = torch.nonzero(best_q[best_db] == torch.arange(len(vq), device=sim.device))[:, 0]
    idb = best_db[iq]
    keep = sim[idb, iq] > threshold
    return vq[iq[keep]], vd[idb[keep]]


def mutual_nn_similarity(query: torch.Tensor, db: torch.Tensor, threshold: float = RERANK_THRESHOLD) -> torch.Tensor:
    """Training variant of the re-ranking score (§9.2): mean cosine over mutual-NN pairs with cosine > threshold.

    query: [Lq, D], db: [Ld, D], L2-normalised rows, zero rows = padding. Differentiable through the kept pairs.
    Fixes: an empty pair set gives 0 instead of NaN (§14 #14); a single mutual NN counts as a pair (§14 #9).
    """
    iq, idb = mutual_nn_pairs(query, db, threshold)
    if len(iq) == 0:
        return (query.sum() + db.sum()) * 0.0   # keeps the graph when nothing matches
    return (query[iq].float() * db[idb].float()).sum(-1).mean()


def local_triplet_loss(g: torch.Tensor, local: torch.Tensor, labels: torch.Tensor,
                       threshold: float = RERANK_THRESHOLD) -> torch.Tensor:
    """L_MNN: Σ over BatchHard triplets of max(0, sim(a, n) − sim(a, p)), margin 0, a sum (not a mean).

    g: [B, D] (only mines the triplets); local: [B, L, 128] padded, normalised local tokens. All pairs of all
    triplets are gathered in one indexing op (one backward scatter instead of one per pair).
    """
    a, p, n = batch_hard_triplets(g, labels)
    length = local.shape[1]
    rows_q, rows_d, segs = [], [], []
    for t, (ia, ip, ineg) in enumerate(zip(a.tolist(), p.tolist(), n.tolist())):
        for s, other in ((2 * t, ip), (2 * t + 1, ineg)):
            iq, idb = mutual_nn_pairs(local[ia], local[other], threshold)
            rows_q.append(ia * length + iq)
            rows_d.append(other * length + idb)
            segs.append(torch.full_like(iq, s))
    zero = local.sum() * 0.0
    if not segs or sum(len(x) for x in segs) == 0:
        return zero
    flat = local.reshape(-1, local.shape[-1]).float()
    seg = torch.cat(segs)
    dots = (flat[torch.cat(rows_q)] * flat[torch.cat(rows_d)]).sum(-1)
    nseg = 2 * len(a)
    sums = torch.zeros(nseg, dtype=dots.dtype, device=dots.device).index_add(0, seg, dots)
    counts = torch.bincount(seg, minlength=nseg).to(dots.dtype)
    sims = sums / counts.clamp(min=1)          # empty pair set -> 0 (§14 #14)
    return zero + F.relu(sims[1::2] - sims[0::2]).sum()


def _groups(labels: torch.Tensor) -> list[list[int]]:
    """Indices of each image's place, in batch order (place-major batches make these consecutive)."""
    members: dict[int, list[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        members.setdefault(int(lab), []).append(i)
    return [members[int(lab)] for lab in labels.tolist()]


def contrast_loss(local_sep: torch.Tensor, mask_sep: torch.Tensor, labels: torch.Tensor,
                  rng: random.Random | None = None, fg_weight: float = 0.7) -> torch.Tensor:
    """L_CE (loss_sep, §10.4): agree on the mask-weighted foreground and background of a same-place partner.

    local_sep: [B, H', W', 128] detached normalised local map; mask_sep: [B, H', W'] soft selection map. For each
    image i a partner j is drawn among the other images of its place; loss_i = 0.7·(1 − cos(fg_i, fg_j)) +
    0.3·(1 − cos(bg_i, bg_j)); the result is the mean over the batch. The gradient flows only through mask_sep.
    """
    rng = rng or random.Random(0)
    feats = local_sep.flatten(1, 2).float()                     # [B, N, 128]
    mask = mask_sep.flatten(1).float()[..., None]               # [B, N, 1]
    fg = F.normalize((feats * mask).sum(1), dim=-1)
    bg = F.normalize((feats * (1.0 - mask)).sum(1), dim=-1)
    groups = _groups(labels)
    total = mask_sep.sum() * 0.0
    for i, group in enumerate(groups):
        others = [j for j in group if j != i]
        if not others:
            continue
        j = rng.choice(others)
        total = total + fg_weight * (1 - (fg[i] * fg[j]).sum()) + (1 - fg_weight) * (1 - (bg[i] * bg[j]).sum())
    return total / len(groups)


def patch_to_local(index: int, grid: int, local_grid: int) -> int:
    """Map a patch row (or column) to the local grid: round((14·r + 7) / (14·grid / local_grid)), half to even."""
    return round((14 * index + 7) / (14 * grid / local_grid))


def _neighbourhood_mean(local_all: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Mean of the 3×3 neighbourhood (clipped at the border) of local_all [H', W', D], not re-normalised."""
    h, w = local_all.shape[:2]
    window = local_all[max(row - 1, 0):min(row + 2, h), max(col - 1, 0):min(col + 2, w)]
    return window.reshape(-1, local_all.shape[-1]).mean(0)


def pseudo_correspondence_loss(f_norm: torch.Tensor, p: torch.Tensor, mask_guide: torch.Tensor,
                               local_all: torch.Tensor, labels: torch.Tensor, drop_first_anchor: bool = True
                               ) -> torch.Tensor:
    """L_PC (§10.5): weakly supervised pseudo-correspondences between an image and the next image of its place.

    f_norm: [B, C, P] normalised backbone patch features; p: [B, m, P] Sinkhorn assignment; mask_guide: [B, P];
    local_all: [B, H', W', D] normalised local map with H' = 4h − 3. Anchors are patches with mask_guide > 0.1
    (the first dropped, as in the official code); each looks for its best match among the partner's patches of the
    same cluster (p > 0.1), kept if top1 > 0.8 and top1 > 2·top2 > 0; at most 5 pairs per image. The loss is
    Σ (1 − cos(anchor, match)) · top1 · 1e-2 over the 3×3-averaged local descriptors, divided by the pair count.
    """
    bsz, _, npatch = f_norm.shape
    hl, wl = local_all.shape[1:3]
    h, w = (hl + 3) // 4, (wl + 3) // 4
    if h * w != npatch:
        raise ConfigError(f'L_PC: local grid {hl}x{wl} implies a {h}x{w} patch grid, but there are {npatch} patches')
    groups = _groups(labels)
    terms: list[torch.Tensor] = []
    for i in range(bsz):
        group = groups[i]
        if len(group) < 2:
            continue
        j = group[(group.index(i) + 1) % len(group)]
        anchors = torch.nonzero(mask_guide[i].detach() > PC_ANCHOR_THRESHOLD)[:, 0]
        if len(anchors) < 2:
            continue
        if drop_first_anchor:
            anchors = anchors[1:]
        clusters = p[i].detach().argmax(0)                                   # [P]
        sims = f_norm[i].T[anchors].float() @ f_norm[j].float()            # [A, P]
        cand = p[j].detach()[clusters[anchors]] > PC_CANDIDATE_THRESHOLD    # [A, P]
        sims = torch.where(cand, sims, torch.full_like(sims, -10.0))
        top = sims.topk(2, dim=1).values if npatch >= 2 else None
        if top is None:
            continue
        ok = (top[:, 0] > PC_MIN_SIM) & (top[:, 1] > 0) & (top[:, 0] > PC_RATIO * top[:, 1])
        kept = torch.nonzero(ok)[:PC_MAX_PAIRS, 0].tolist()
        matches = sims.argmax(1)
        for k in kept:
            a, b = int(anchors[k]), int(matches[k])
            da = _neighbourhood_mean(local_all[i], patch_to_local(a // w, h, hl), patch_to_local(a % w, w, wl))
            db = _neighbourhood_mean(local_all[j], patch_to_local(b // w, h, hl), patch_to_local(b % w, w, wl))
            terms.append((1 - F.cosine_similarity(da.float(), db.float(), dim=0)) * top[k, 0] * PC_SCALE)
    if not terms:
        return local_all.sum() * 0.0
    return torch.stack(terms).sum() / len(terms)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the five terms (paper values: 1, 1, 5e-3 on kl1 + kl2, 1, 1)."""

    ms: float = 1.0
    mnn: float = 1.0
    sa: float = 5e-3
    ce: float = 1.0
    pc: float = 1.0


def _field(out: Any, name: str) -> Any:
    return out[name] if isinstance(out, dict) else getattr(out, name)


def _ws(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f_norm, p, local_all): fields of the output, or its official `ws_info` triple."""
    if (isinstance(out, dict) and 'f_norm' in out) or hasattr(out, 'f_norm'):
        return _field(out, 'f_norm'), _field(out, 'p'), _field(out, 'local_all')
    ws = _field(out, 'ws_info')
    if isinstance(ws, (tuple, list)):
        return ws[0], ws[1], ws[2]
    return _field(ws, 'f_norm'), _field(ws, 'p'), _field(ws, 'local_all')


@dataclass
class FoLObjective:
    """The total loss on a `forward_train` output; returns (total, {term: float})."""

    weights: LossWeights = field(default_factory=LossWeights)
    threshold: float = RERANK_THRESHOLD
    seed: int = 0
    drop_first_anchor: bool = True

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, out: Any, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        wt = self.weights
        g, local = _field(out, 'g'), _field(out, 'local')
        parts: dict[str, torch.Tensor] = {}
        if wt.ms:
            parts['ms'] = multi_similarity_loss(g, labels)
        if wt.mnn:
            parts['mnn'] = local_triplet_loss(g, local, labels, self.threshold)
        if wt.sa:
            parts['sa'] = _field(out, 'kl1').float() + _field(out, 'kl2').float()
        if wt.ce:
            parts['ce'] = contrast_loss(_field(out, 'local_sep'), _field(out, 'mask_sep'), labels, self._rng)
        if wt.pc:
            f_norm, p, local_all = _ws(out)
            parts['pc'] = pseudo_correspondence_loss(f_norm, p, _field(out, 'mask_guide'), local_all, labels,
                                                     self.drop_first_anchor)
        total = sum(getattr(wt, k) * v for k, v in parts.items())
        values = {k: float(v.detach()) for k, v in parts.items()}
        for k, v in values.items():
            if v != v:  # NaN: report which term so the fix is obvious
                log.warning('loss term %s is NaN', k)
        return total, values

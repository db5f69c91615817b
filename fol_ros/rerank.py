"""Stage 5: FoL local re-ranking (fol-method §9.2) with the §14 fixes, batched and memory bounded.

Score of a candidate = number of mutual nearest-neighbour (MNN) pairs between the query's and the candidate's
local tokens whose cosine similarity is > threshold (0.7, strict). Fixes over the official code (§14):
#9  a single MNN pair counts 1 (the official `squeeze()` made it 0; `single_match_quirk=True` mirrors that);
#10 candidates are re-ordered by a stable descending sort, ties broken by global retrieval rank;
#22 tokens stay ragged (no 3600-row padding in storage) and fp16; the similarity workspace is chunked.

The official code builds M = K x L x L at once (5.2 GB for K=100). Here candidates are grouped into chunks,
zero-padded to the chunk's longest token list (padding never yields a pair above a threshold >= 0; it is masked
out otherwise), and the query tokens are tiled when even one candidate's block exceeds the budget; the
running argmax over query tiles keeps the first maximum, like torch/numpy argmax.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from fol_ros.config import RerankConfig
from fol_ros.errors import ConfigError
from fol_ros.records import Candidate, Encoding

LOG = logging.getLogger(__name__)


def _device(device: str) -> torch.device:
    dev = torch.device('cuda' if device == 'auto' and torch.cuda.is_available() else
                       'cpu' if device == 'auto' else device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'rerank device {device!r} requested but CUDA is not available; use device=cpu')
    return dev


def _tensor(arr: np.ndarray, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    # np.array copies: map tokens are read-only memory maps, which torch.as_tensor warns about
    return torch.from_numpy(np.array(arr, dtype=np.float16 if dtype == torch.float16 else np.float32)).to(dev)


def _mnn_blocks(query: np.ndarray, cands: Sequence[np.ndarray], budget_mb: float, device: str, mask: bool):
    """Yield (candidate indices, *_mnn_chunk(...)) over chunks that fit the memory budget."""
    dev = _device(device)
    dtype = torch.float16 if dev.type == 'cuda' else torch.float32
    q = _tensor(query, dtype, dev)
    lq = q.shape[0]
    budget = max(1.0, float(budget_mb)) * 2 ** 20
    elem = torch.finfo(dtype).bits // 8   # bytes per similarity entry
    start = 0
    while start < len(cands):
        lmax = max(1, max(len(c) for c in cands[start:start + 1]))
        tile = int(min(lq, max(1, budget // (lmax * elem))))
        k = 1
        while start + k < len(cands):   # grow the chunk while the padded block fits the budget
            grown = max(lmax, len(cands[start + k]))
            if (k + 1) * grown * tile * elem > budget:
                break
            lmax, k = grown, k + 1
        yield range(start, start + k), *_mnn_chunk(q, cands[start:start + k], lmax, tile, dtype, dev, mask)
        start += k


def _mnn_chunk(q: torch.Tensor, cands: Sequence[np.ndarray], lmax: int, tile: int, dtype, dev, mask: bool):
    """Mutual nearest neighbours of one chunk, seen from the candidate rows.

    Returns (best query token of each candidate row i2 [k, Lc], its similarity [k, Lc], valid [k, Lc]) where
    valid marks rows that are also the first-occurring best row of their query token (the official
    `max2[max1[j]] == j` test).
    """
    k, (lq, d) = len(cands), q.shape
    c = torch.zeros((k, lmax, d), dtype=dtype, device=dev)
    ragged = False
    for i, cand in enumerate(cands):
        if len(cand):
            c[i, :len(cand)] = _tensor(cand, dtype, dev)
        ragged |= len(cand) < lmax
    # Zero padding rows have cosine 0 with every query token: they can only win for query tokens whose best
    # real match is <= 0, which never pass a threshold >= 0, and they never change the mutual check of real
    # rows. So the -inf mask (one extra pass over the block) is only needed for negative thresholds.
    pad = None
    if ragged and mask:
        lens = torch.tensor([len(x) for x in cands], device=dev)
        pad = (torch.arange(lmax, device=dev)[None] >= lens[:, None])[:, :, None]
    i1 = torch.empty((k, lq), dtype=torch.int64, device=dev)
    rowmax, i2 = None, None
    for t0 in range(0, lq, tile):
        sim = torch.matmul(c, q[t0:t0 + tile].T)   # [k, Lc, t]
        if pad is not None:
            sim.masked_fill_(pad, -torch.inf)
        i1[:, t0:t0 + tile] = sim.argmax(dim=1)
        j2 = sim.argmax(dim=2)
        v2 = sim.gather(2, j2[:, :, None]).squeeze(2)
        if rowmax is None:
            rowmax, i2 = v2, j2 + t0
        else:
            better = v2 > rowmax          # strict: an earlier tile keeps ties (first maximum)
            rowmax = torch.where(better, v2, rowmax)
            i2 = torch.where(better, j2 + t0, i2)
    rows = torch.arange(lmax, device=dev)[None]
    return i2, rowmax, i1.gather(1, i2) == rows


def mutual_nn_counts(query_local: np.ndarray, cand_locals: Sequence[np.ndarray], threshold: float = 0.7,
                     budget_mb: float = 512.0, device: str = 'cpu', single_match_quirk: bool = False,
                     pairs_out: list | None = None) -> np.ndarray:
    """FoL local score of each candidate: the number of MNN token pairs with cosine > threshold.

    Args:
        query_local: [Lq, D] unit-norm query tokens (fp16 or fp32; zero rows are allowed and never count).
        cand_locals: K arrays [L_k, D], ragged.
        budget_mb: bound on the similarity workspace; candidates (and if needed query tokens) are chunked to fit.
        device: 'cpu', 'cuda', 'cuda:N' or 'auto'; CUDA computes in fp16.
        single_match_quirk: mirror official quirk A (exactly one MNN scores 0) for bit parity.
        pairs_out: if a list is given, it receives each candidate's counted pairs (query rows, candidate rows),
            as `mutual_nn_pairs` returns them, from the same pass (geometric verification needs no second one).
    Returns:
        int64 [K].
    """
    counts = np.zeros(len(cand_locals), np.int64)
    if len(cand_locals) == 0 or len(query_local) == 0:
        return counts
    with torch.inference_mode():
        for idx, i2, v, mutual in _mnn_blocks(query_local, cand_locals, budget_mb, device,
                                             threshold < 0 or single_match_quirk):
            matched = mutual & (v > threshold)
            good = matched.sum(1)
            if pairs_out is not None:
                pairs_out.extend(_pairs(i2_row, matched_row) for i2_row, matched_row in zip(i2, matched))
            if single_match_quirk:
                good = torch.where(mutual.sum(1) == 1, torch.zeros_like(good), good)
            counts[idx.start:idx.stop] = good.cpu().numpy()
    return counts


def _pairs(i2: torch.Tensor, matched: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, candidate rows) of one candidate's counted pairs, sorted by query row."""
    ic = torch.nonzero(matched).reshape(-1)
    iq = i2[ic]
    order = torch.argsort(iq)
    return iq[order].cpu().numpy(), ic[order].cpu().numpy()


def mutual_nn_pairs(query_local: np.ndarray, cand_local: np.ndarray, threshold: float = 0.7,
                    budget_mb: float = 512.0, device: str = 'cpu') -> tuple[np.ndarray, np.ndarray]:
    """The MNN pairs counted by `mutual_nn_counts` for one candidate: (query token rows, candidate token rows)."""
    if len(query_local) == 0 or len(cand_local) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    with torch.inference_mode():
        (_, i2, v, mutual), = _mnn_blocks(query_local, [cand_local], budget_mb, device, threshold < 0)
        return _pairs(i2[0], (mutual & (v > threshold))[0])


def rerank(candidates: Sequence[Candidate] | np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Order of candidates by descending local score; equal scores keep the global retrieval order (stable).

    Args:
        candidates: Candidates (their `retrieval_rank` breaks ties) or an array of retrieval ranks.
        scores: [K] local scores.
    Returns:
        int64 [K] indices into `candidates`, best first.
    """
    if len(candidates) and isinstance(candidates[0], Candidate):
        ranks = np.array([c.retrieval_rank for c in candidates], np.int64)
    else:
        ranks = np.asarray(candidates, np.int64).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    if len(ranks) != len(scores):
        raise ConfigError(f'{len(ranks)} candidates but {len(scores)} scores')
    return np.lexsort((ranks, -scores.astype(np.float64))).astype(np.int64)


def rerank_candidates(query: Encoding, candidates: list[Candidate], place_map, config: RerankConfig = RerankConfig(),
                      pairs_out: dict | None = None) -> list[Candidate]:
    """Score the first `config.top_k` candidates (in global order) and return them re-ranked, the rest after.

    Sets `local_matches` on the scored candidates. `place_map` must provide `local_tokens(place_id)`.
    With `pairs_out` (a dict), the counted token pairs of each scored place id are stored there for verification.
    """
    if not config.enabled or not candidates:
        return list(candidates)
    head, tail = list(candidates[:config.top_k]), list(candidates[config.top_k:])
    locals_ = [place_map.local_tokens(c.place_id)[0] for c in head]
    pairs = [] if pairs_out is not None else None
    counts = mutual_nn_counts(query.local, locals_, config.similarity_threshold, config.memory_budget_mb,
                              config.device, pairs_out=pairs)
    if pairs_out is not None:
        pairs_out.update(zip((c.place_id for c in head), pairs))
    for cand, count in zip(head, counts):
        cand.local_matches = int(count)
    return [head[i] for i in rerank(head, counts)] + tail

"""Stage 5: FoL local re-ranking (fol-method §9.2) with the §14 fixes, batched and memory bounded.

Score of a candidate = number of mutual nearest-neighbour (MNN) pairs between the query's and the candidate's
local tokens whose cosine similarity is > threshold (0.7, strict). Fixes over the official code (§14):
#9  a single MNN pair counts 1 (the official `squeeze()` made it 0; `single_match_quirk=True` mirrors that);
#10 candidates are re-ordered by a stable descending sort, ties broken by global retrieval rank;
#22 tokens stay ragged (no 3600-row padding in storage) and fp16.

The official code builds M = K x L x L at once (5.2 GB for K=100). `fol_ros.mutual_nn` computes the same pairs
tile by tile (the similarity tile, both maxima and the mutual test fused per tile, exact in fp32), so the
workspace is one tile of at most `memory_budget_mb`. On CPUs with bf16 instructions `fol_ros.mutual_nn_bf16`
screens in bf16 and decides every maximum in fp32: the same pairs, faster (`kernel`: auto | fp32 | bf16).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fol_ros.config import RerankConfig
from fol_ros.errors import ConfigError
from fol_ros import mutual_nn_bf16
from fol_ros.mutual_nn import Matches, match, match_dense
from fol_ros.records import Candidate, Encoding

LOG = logging.getLogger(__name__)


def _device(device: str) -> torch.device:
    dev = torch.device('cuda' if device == 'auto' and torch.cuda.is_available() else
                       'cpu' if device == 'auto' else device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'rerank device {device!r} requested but CUDA is not available; use device=cpu')
    return dev


def use_bf16(kernel: str, dev: torch.device) -> bool:
    """Whether `kernel` (auto | fp32 | bf16) runs the bf16 screen on `dev` (CPU only)."""
    if kernel not in ('auto', 'fp32', 'bf16'):
        raise ConfigError(f'rerank kernel {kernel!r}: use auto, fp32 or bf16')
    return dev.type == 'cpu' and (kernel == 'bf16' or (kernel == 'auto' and mutual_nn_bf16.cpu_has_fast_bf16()))


def mutual_nn_match(query_local: np.ndarray, cand_locals: Sequence[np.ndarray], threshold: float = 0.7,
                    budget_mb: float = 512.0, device: str = 'cpu', single_match_quirk: bool = False,
                    kernel: str = 'auto') -> Matches:
    """FoL local score of each candidate and the token pairs it counts (`Matches`), in one pass.

    Args:
        query_local: [Lq, D] unit-norm query tokens (fp16 or fp32; zero rows are allowed and never count).
        cand_locals: K arrays [L_k, D], ragged.
        budget_mb: bound on the similarity workspace (one tile of rows x query tokens, at least 64 rows).
        device: 'cpu', 'cuda', 'cuda:N' or 'auto'.
        single_match_quirk: mirror official quirk A (exactly one MNN scores 0) for bit parity.
        kernel: auto | fp32 | bf16 (`use_bf16`); the result is the same, the bf16 screen is skipped where it
            does not apply (quirk A, threshold <= 0.1, non-finite tokens).
    """
    dev = _device(device)
    with torch.inference_mode():
        if (use_bf16(kernel, dev) and not single_match_quirk
                and mutual_nn_bf16.usable(query_local, cand_locals, threshold)):
            return mutual_nn_bf16.match(query_local, cand_locals, threshold, budget_mb, dev)
        if dev.type == 'cuda' and not single_match_quirk:
            return match_dense(query_local, cand_locals, threshold, budget_mb, dev)
        return match(query_local, cand_locals, threshold, budget_mb, dev, single_match_quirk)


def warm_up(config: RerankConfig) -> None:
    """Load the kernel `config` selects (the bf16 screen's compiled loops: ~1 s to compile on a machine's first
    run, then read from numba's cache) on a tiny input, so that the first frame re-ranked does not pay for it,
    even when the map is still empty at start-up."""
    if not config.enabled:
        return
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(96, 128)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    mutual_nn_counts(tokens, [tokens[:80]], config.similarity_threshold, config.memory_budget_mb, config.device,
                     kernel=config.kernel)


def mutual_nn_counts(query_local: np.ndarray, cand_locals: Sequence[np.ndarray], threshold: float = 0.7,
                     budget_mb: float = 512.0, device: str = 'cpu', single_match_quirk: bool = False,
                     kernel: str = 'auto') -> np.ndarray:
    """FoL local score of each candidate: the number of MNN token pairs with cosine > threshold, int64 [K]."""
    return mutual_nn_match(query_local, cand_locals, threshold, budget_mb, device, single_match_quirk,
                           kernel).counts


def mutual_nn_pairs(query_local: np.ndarray, cand_local: np.ndarray, threshold: float = 0.7,
                    budget_mb: float = 512.0, device: str = 'cpu',
                    kernel: str = 'auto') -> tuple[np.ndarray, np.ndarray]:
    """The MNN pairs counted by `mutual_nn_counts` for one candidate: (query token rows, candidate token rows)."""
    return mutual_nn_match(query_local, [cand_local], threshold, budget_mb, device, kernel=kernel).pairs[0]


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


@dataclass(frozen=True)
class Reranked:
    """Result of `rerank_candidates`.

    Attributes:
        candidates: the scored head re-ranked (stable, ties by global rank), then the unscored tail.
        pairs: counted token pairs (query rows, candidate rows) of each scored place id, for verification.
    """

    candidates: list[Candidate]
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def rerank_candidates(query: Encoding, candidates: list[Candidate], place_map,
                      config: RerankConfig = RerankConfig()) -> Reranked:
    """Score the first `config.top_k` candidates (in global order) and re-rank them, the rest after.

    Sets `local_matches` on the scored candidates. `place_map` must provide `local_tokens(place_id)`.
    """
    if not config.enabled or not candidates:
        return Reranked(list(candidates))
    head, tail = list(candidates[:config.top_k]), list(candidates[config.top_k:])
    locals_ = [place_map.local_tokens(c.place_id)[0] for c in head]
    found = mutual_nn_match(query.local, locals_, config.similarity_threshold, config.memory_budget_mb,
                            config.device, kernel=config.kernel)
    for cand, count in zip(head, found.counts):
        cand.local_matches = int(count)
    order = rerank(head, found.counts)
    return Reranked([head[i] for i in order] + tail, {c.place_id: p for c, p in zip(head, found.pairs)})

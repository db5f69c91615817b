"""Mutual nearest neighbours between one query token set and K candidate token sets, tiled and exact.

This is the numerical core of FoL re-ranking (fol-method §9.2). A pair (query token j, candidate token i) counts
when i is the first best candidate token of j, j is the first best query token of i (torch/numpy argmax
semantics) and their cosine is > threshold. Exactness target: the official dense formulation in fp32, i.e. the
argmaxes of an fp32 matmul and the threshold applied to `(q * c).sum(-1)` of the matched rows.

Layout and why:
* Every candidate is zero-padded to a multiple of ALIGN rows and the query to a multiple of ALIGN columns: torch's
  CPU GEMM is markedly slower on odd sizes (e.g. 3291 rows). Padding is masked to -inf in the similarity tile, so
  it can never be a best match, whatever the threshold.
* The candidates' rows are processed in tiles of R rows against ALL query columns, so one tile gives the final
  row maximum and row argmax of its rows; the column maxima are carried across the tiles of a candidate with
  `amax` (a cheap vectorised reduction; argmax along columns is not). The K x L x L matrix is never held.
* A candidate row i with best query token j is mutual iff its best value equals the column maximum of j AND i is
  the FIRST row reaching that maximum. The second condition is decided exactly by recomputing the few columns
  that carry such candidate pairs; an fp32 GEMM gives bit-identical values for any number of rows/columns >= 2
  (only the 1-wide GEMV path differs), which is why recomputed columns are padded to ALIGN as well.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 64            # row/column padding of the GEMM operands
TILE_ROWS_MAX = 256   # rows per similarity tile: measured best on 2 cores (L2 1 MB/core, L3 32 MB) at Lq ~3.3k


@dataclass(frozen=True)
class Matches:
    """Counted token pairs of each candidate.

    Attributes:
        counts: int64 [K], counted pairs per candidate (0 for quirk-A candidates, see `match`).
        pairs: per candidate (query rows, candidate rows), int64, sorted by query row.
    """

    counts: np.ndarray
    pairs: list[tuple[np.ndarray, np.ndarray]]


def padded(n: int) -> int:
    """n rounded up to a multiple of ALIGN (at least ALIGN)."""
    return max(ALIGN, -(-n // ALIGN) * ALIGN)


def tile_rows(query_cols: int, budget_mb: float) -> int:
    """Rows per fp32 similarity tile [R, query_cols] under the budget: a multiple of ALIGN, at least ALIGN."""
    fit = int(float(budget_mb) * 2 ** 20 // (4 * query_cols)) // ALIGN * ALIGN
    return min(TILE_ROWS_MAX, max(ALIGN, fit))


def dot_margin(dim: int, max_norm_q: float, max_norm_c: float) -> float:
    """Bound on |fp32 GEMM dot - fp32 `(q * c).sum()` dot| for vectors of the given norms.

    Each fp32 evaluation of a dim-term dot product is within gamma_dim * sum|q_k c_k| <= gamma_dim * |q| |c| of the
    exact value (Higham, Thm 3.1, any summation order), gamma_n = n u / (1 - n u), u = 2^-24; two evaluations differ
    by at most twice that. Rows whose GEMM maximum is above `threshold - margin` can pass the official threshold.
    """
    u = 2.0 ** -24
    gamma = dim * u / (1 - dim * u)
    return 2 * gamma * max_norm_q * max_norm_c * (1 + 1e-6) + 1e-30


def _to_tensor(arr: np.ndarray, dev: torch.device) -> torch.Tensor:
    # np.array copies (map tokens are read-only memory maps, which torch.from_numpy warns about) and converts fp16
    return torch.from_numpy(np.array(arr, dtype=np.float32)).to(dev)


def _padded_tokens(arr: np.ndarray, dev: torch.device) -> torch.Tensor:
    out = torch.zeros((padded(len(arr)), arr.shape[1]), dtype=torch.float32, device=dev)
    if len(arr):
        out[:len(arr)] = _to_tensor(arr, dev)
    return out


def _max_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dim=1).max()) if len(t) else 0.0


class _Rows:
    """The candidates' rows as one virtual matrix: candidate k occupies rows offsets[k] .. offsets[k] + padded(L_k)."""

    def __init__(self, cands: Sequence[np.ndarray]) -> None:
        self.cands = cands
        self.lengths = [len(c) for c in cands]
        self.offsets = np.concatenate([[0], np.cumsum([padded(n) for n in self.lengths])]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def segments(self, r0: int, r1: int):
        """(candidate k, first row of k in the tile, first tile row, row count) of each candidate in [r0, r1)."""
        k = int(np.searchsorted(self.offsets, r0, side='right')) - 1
        while k < len(self.lengths) and self.offsets[k] < r1:
            a, b = max(r0, int(self.offsets[k])), min(r1, int(self.offsets[k + 1]))
            yield k, a - int(self.offsets[k]), a - r0, b - a
            k += 1

    def fill(self, tile: torch.Tensor, r0: int, r1: int) -> None:
        """Copy rows [r0, r1) (fp32, zero padding rows) into tile[:r1 - r0]."""
        tile[:r1 - r0].zero_()
        for k, first, at, n in self.segments(r0, r1):
            real = max(0, min(n, self.lengths[k] - first))
            if real:
                tile[at:at + real] = _to_tensor(self.cands[k][first:first + real], tile.device)


def _mask_padding(sim: torch.Tensor, rows: _Rows, r0: int, r1: int, query_len: int) -> None:
    sim[:, query_len:] = -torch.inf
    for k, first, at, n in rows.segments(r0, r1):
        pad_from = max(0, rows.lengths[k] - first)
        if pad_from < n:
            sim[at + pad_from:at + n] = -torch.inf


def _first_argmax_of_columns(cand: torch.Tensor, cand_len: int, q: torch.Tensor, cols: torch.Tensor,
                             chunk: int) -> torch.Tensor:
    """First best candidate row of each query column in `cols`, from the same fp32 GEMM as the tiles."""
    out = torch.empty(len(cols), dtype=torch.int64, device=q.device)
    for c0 in range(0, len(cols), chunk):
        part = cols[c0:c0 + chunk]
        width = padded(len(part))                  # never the 1-wide GEMV path: bit-identical to the tiles
        idx = torch.cat([part, part.new_zeros(width - len(part))])
        sim = cand @ q[idx].T
        sim[cand_len:] = -torch.inf
        out[c0:c0 + len(part)] = sim.argmax(0)[:len(part)]
    return out


def match(query: np.ndarray, cands: Sequence[np.ndarray], threshold: float, budget_mb: float,
          dev: torch.device, single_match_quirk: bool = False) -> Matches:
    """Counted mutual-NN pairs of every candidate (see the module doc), fp32, exact.

    Args:
        query: [Lq, D] tokens (fp16 or fp32).
        cands: K arrays [L_k, D], ragged; empty ones score 0.
        threshold: strict cosine threshold (any value; padding is masked, not relied upon).
        budget_mb: bound on the similarity workspace (one tile; at least ALIGN rows).
        single_match_quirk: official quirk A: a candidate with exactly one mutual pair (before the threshold)
            scores 0.
    """
    k_total = len(cands)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if k_total == 0 or len(query) == 0:
        return Matches(np.zeros(k_total, np.int64), [empty] * k_total)
    q = _padded_tokens(query, dev)
    lq = len(query)
    rows = _Rows(cands)
    r_tile = tile_rows(q.shape[0], budget_mb)
    tile = torch.empty((r_tile, q.shape[1]), dtype=torch.float32, device=dev)
    sim = torch.empty((r_tile, q.shape[0]), dtype=torch.float32, device=dev)
    row_val = torch.empty(rows.total, dtype=torch.float32, device=dev)
    row_arg = torch.empty(rows.total, dtype=torch.int64, device=dev)
    col_max = torch.full((k_total, q.shape[0]), -torch.inf, dtype=torch.float32, device=dev)
    max_norm_c = 0.0
    for r0 in range(0, rows.total, r_tile):
        r1 = min(rows.total, r0 + r_tile)
        rows.fill(tile, r0, r1)
        max_norm_c = max(max_norm_c, _max_norm(tile[:r1 - r0]))
        s = torch.matmul(tile[:r1 - r0], q.T, out=sim[:r1 - r0])
        _mask_padding(s, rows, r0, r1, lq)
        torch.max(s, dim=1, out=(row_val[r0:r1], row_arg[r0:r1]))     # first maximum, like argmax
        for k, _, at, n in rows.segments(r0, r1):
            torch.maximum(col_max[k], s[at:at + n].amax(0), out=col_max[k])
    live = -torch.inf if single_match_quirk else threshold - dot_margin(q.shape[1], _max_norm(q), max_norm_c)
    chunk = max(ALIGN, r_tile * q.shape[0] // max(1, max(padded(n) for n in rows.lengths)) // ALIGN * ALIGN)
    counts = np.zeros(k_total, np.int64)
    pairs = []
    for k, cand in enumerate(cands):
        lc = rows.lengths[k]
        o = int(rows.offsets[k])
        v, j = row_val[o:o + lc], row_arg[o:o + lc]
        ic = torch.nonzero((v > live) & (v == col_max[k][j])).reshape(-1)
        if len(ic) == 0:
            pairs.append(empty)
            continue
        jq = j[ic]
        cols, where = torch.unique(jq, return_inverse=True)
        cand_t = _padded_tokens(cand, dev)
        best_row = _first_argmax_of_columns(cand_t, lc, q, cols, chunk)
        mutual = best_row[where] == ic
        ic, jq = ic[mutual], jq[mutual]
        # the official threshold test: the elementwise dot of the matched rows, not the GEMM value
        keep = (q[jq] * cand_t[ic]).sum(-1) > threshold
        order = torch.argsort(jq[keep])
        iq_k, ic_k = jq[keep][order].cpu().numpy(), ic[keep][order].cpu().numpy()
        pairs.append((iq_k, ic_k))
        counts[k] = 0 if single_match_quirk and len(ic) == 1 else len(iq_k)
    return Matches(counts, pairs)

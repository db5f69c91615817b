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
  row maximum and row argmax of its rows; the column maxima are carried across the tiles of a candidate (a max,
  not an argmax: a column argmax is an expensive strided reduction). The K x L x L matrix is never held.
* Only the GEMMs run in torch (multi-threaded). On the CPU the reductions run in numpy on the tile's memory:
  numpy's SIMD argmax/max are single-threaded and 3-30x faster than torch's max(dim) here, and they wait on no
  OpenMP barrier, which on a shared CPU costs milliseconds per small multi-threaded op.
* A candidate row i with best query token j is mutual iff its best value equals the column maximum of j AND i is
  the FIRST row reaching that maximum. The second condition is decided exactly by recomputing the few columns
  that carry such candidate pairs; an fp32 GEMM gives bit-identical values for any number of rows/columns >= 2
  (only the 1-wide GEMV path differs), which is why recomputed columns are padded to ALIGN as well.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

LOG = logging.getLogger(__name__)


def _load_compiled_loops():
    """`fol_ros.mutual_nn_jit`, or None where numba is missing or cannot cache (then numpy does the same)."""
    try:
        from fol_ros import mutual_nn_jit
        return mutual_nn_jit
    except Exception as exc:   # numba missing, or no writable cache dir
        LOG.warning('re-ranking without numba (%s): the same counts, up to 1.45x slower; pip install numba / apt '
                    'install python3-numba, or set NUMBA_CACHE_DIR to a writable folder', exc)
        return None


JIT = _load_compiled_loops()


def use_compiled(compiled: bool | None) -> bool:
    """Whether to run the numba loops: `compiled` None = where they loaded; True without numba is an error."""
    if compiled and JIT is None:
        raise ImportError('the compiled re-ranking loops need numba: pip install numba (apt: python3-numba)')
    return JIT is not None if compiled is None else bool(compiled)

ALIGN = 64            # row/column padding of the GEMM operands
# rows per similarity tile (14 MB at Lq 3.4k): as fast as 256 when quiet, fewer OpenMP barriers when loaded
TILE_ROWS_MAX = 1024


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


def _fp32_padded(arr: np.ndarray) -> np.ndarray:
    """[padded(L), D] fp32 copy, zero rows after the real ones (fp16 map tokens convert exactly)."""
    out = np.zeros((padded(len(arr)), arr.shape[1]), np.float32)
    out[:len(arr)] = arr
    return out


def _max_norm(arr: np.ndarray) -> float:
    return float(np.sqrt(np.einsum('ij,ij->i', arr, arr).max())) if len(arr) else 0.0


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

    def fill(self, tile: np.ndarray, r0: int, r1: int) -> None:
        """Copy the real rows among [r0, r1) into tile[:r1 - r0] (padding rows keep stale finite values: their
        similarities are masked to -inf after the GEMM, so they are not cleared)."""
        for k, first, at, n in self.segments(r0, r1):
            real = max(0, min(n, self.lengths[k] - first))
            tile[at:at + real] = self.cands[k][first:first + real]

    def padding(self, r0: int, r1: int):
        """(first, end) tile rows of each padding block among [r0, r1)."""
        for k, first, at, n in self.segments(r0, r1):
            pad_from = max(0, self.lengths[k] - first)
            if pad_from < n:
                yield at + pad_from, at + n


def _reduce_tile(sim: torch.Tensor, rows: _Rows, r0: int, r1: int, query_len: int,
                 row_val: np.ndarray, row_arg: np.ndarray, col_max: np.ndarray, col_arg: np.ndarray | None) -> None:
    """Mask the padding of one similarity tile, store its row max/first argmax, fold its column maxima in (and,
    with `col_arg` on the CPU, their first rows: `mutual_nn_jit.fold_columns`)."""
    if sim.device.type == 'cpu':
        a = sim.numpy()                       # same memory
        a[:, query_len:] = -np.inf
        for p0, p1 in rows.padding(r0, r1):
            a[p0:p1] = -np.inf
        arg = a.argmax(1)                     # first maximum, like torch/numpy argmax everywhere
        row_arg[r0:r1] = arg
        row_val[r0:r1] = np.take_along_axis(a, arg[:, None], 1)[:, 0]
        for k, first, at, n in rows.segments(r0, r1):
            if col_arg is not None:
                JIT.fold_columns(a[at:at + n], first, col_max[k], col_arg[k])
            else:
                np.maximum(col_max[k], a[at:at + n].max(0), out=col_max[k])
        return
    sim[:, query_len:] = -torch.inf
    for p0, p1 in rows.padding(r0, r1):
        sim[p0:p1] = -torch.inf
    val, arg = sim.max(1)
    row_val[r0:r1], row_arg[r0:r1] = val.cpu().numpy(), arg.cpu().numpy()
    for k, _, at, n in rows.segments(r0, r1):
        np.maximum(col_max[k], sim[at:at + n].amax(0).cpu().numpy(), out=col_max[k])


def _first_argmax_of_columns(cand: torch.Tensor, cand_len: int, q: torch.Tensor, cols: np.ndarray,
                             chunk: int) -> np.ndarray:
    """First best candidate row of each query column in `cols`, from the same fp32 GEMM as the tiles."""
    out = np.empty(len(cols), np.int64)
    for c0 in range(0, len(cols), chunk):
        part = cols[c0:c0 + chunk]
        idx = np.zeros(padded(len(part)), np.int64)   # never the 1-wide GEMV path: bit-identical to the tiles
        idx[:len(part)] = part
        sim = cand @ q[torch.from_numpy(idx).to(q.device)].T
        sim[cand_len:] = -torch.inf
        out[c0:c0 + len(part)] = sim.argmax(0)[:len(part)].cpu().numpy()
    return out


def match(query: np.ndarray, cands: Sequence[np.ndarray], threshold: float, budget_mb: float,
          dev: torch.device, single_match_quirk: bool = False, compiled: bool | None = None) -> Matches:
    """Counted mutual-NN pairs of every candidate (see the module doc), fp32, exact.

    Args:
        query: [Lq, D] tokens (fp16 or fp32).
        cands: K arrays [L_k, D], ragged; empty ones score 0.
        threshold: strict cosine threshold (any value; padding is masked, not relied upon).
        budget_mb: bound on the similarity workspace (one tile; at least ALIGN rows).
        dev: where the GEMMs run.
        single_match_quirk: official quirk A: a candidate with exactly one mutual pair (before the threshold)
            scores 0.
        compiled: on the CPU, keep each column's first best row while folding the tiles (numba; default where it
            loads) instead of recomputing the columns that carry candidate pairs; the same pairs either way.
    """
    k_total = len(cands)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if k_total == 0 or len(query) == 0:
        return Matches(np.zeros(k_total, np.int64), [empty] * k_total)
    q_np = _fp32_padded(query)
    q = torch.from_numpy(q_np).to(dev)
    lq, lq_pad = len(query), q.shape[0]
    rows = _Rows(cands)
    r_tile = tile_rows(lq_pad, budget_mb)
    tile_np = np.zeros((r_tile, q.shape[1]), np.float32)
    sim = torch.empty((r_tile, lq_pad), dtype=torch.float32, device=dev)
    row_val = np.empty(rows.total, np.float32)
    row_arg = np.empty(rows.total, np.int64)
    col_max = np.full((k_total, lq_pad), -np.inf, np.float32)
    col_arg = np.full((k_total, lq_pad), -1, np.int64) if dev.type == 'cpu' and use_compiled(compiled) else None
    for r0 in range(0, rows.total, r_tile):
        r1 = min(rows.total, r0 + r_tile)
        rows.fill(tile_np, r0, r1)
        tile = torch.from_numpy(tile_np[:r1 - r0]).to(dev)
        _reduce_tile(torch.matmul(tile, q.T, out=sim[:r1 - r0]), rows, r0, r1, lq, row_val, row_arg, col_max,
                     col_arg)
    norm_q = _max_norm(q_np)
    chunk = max(ALIGN, r_tile * lq_pad // max(padded(n) for n in rows.lengths) // ALIGN * ALIGN)
    counts = np.zeros(k_total, np.int64)
    pairs = []
    for k, cand in enumerate(cands):
        lc, o = rows.lengths[k], int(rows.offsets[k])
        cand_np = _fp32_padded(cand)
        live = -np.inf if single_match_quirk else threshold - dot_margin(q.shape[1], norm_q, _max_norm(cand_np))
        v, j = row_val[o:o + lc], row_arg[o:o + lc]
        ic = np.nonzero((v > live) & (v == col_max[k][j]))[0]
        if len(ic) == 0:
            pairs.append(empty)
            continue
        jq = j[ic]
        cand_t = torch.from_numpy(cand_np).to(dev)
        if col_arg is not None:
            mutual = col_arg[k][jq] == ic
        else:
            cols, where = np.unique(jq, return_inverse=True)
            mutual = _first_argmax_of_columns(cand_t, lc, q, cols, chunk)[where] == ic
        ic, jq = ic[mutual], jq[mutual]
        # the official threshold test: torch's elementwise dot of the matched rows, not the GEMM value
        iq_t, ic_t = torch.from_numpy(jq).to(dev), torch.from_numpy(ic).to(dev)
        keep = ((q[iq_t] * cand_t[ic_t]).sum(-1) > threshold).cpu().numpy()
        order = np.argsort(jq[keep], kind='stable')
        pairs.append((jq[keep][order], ic[keep][order]))
        counts[k] = 0 if single_match_quirk and len(ic) == 1 else int(keep.sum())
    return Matches(counts, pairs)


def match_dense(query: np.ndarray, cands: Sequence[np.ndarray], threshold: float, budget_mb: float,
                dev: torch.device) -> Matches:
    """The same pairs as `match`, from whole similarity matrices: candidates in groups whose [G, Lc, Lq] fp32
    matrix fits `budget_mb` (at least one candidate), one batched GEMM and both argmaxes per group.

    For GPUs: there the GEMM is ~1 ms and what costs is the number of kernel launches and host syncs, which this
    keeps to a handful per group (the tiled `match` issues several per 1024-row tile). On the CPU `match` is
    faster (its numpy reductions beat torch's argmax over a dim); this path is tested there for equality.
    """
    k_total = len(cands)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if k_total == 0 or len(query) == 0:
        return Matches(np.zeros(k_total, np.int64), [empty] * k_total)
    q = torch.from_numpy(_fp32_padded(query)).to(dev)
    lq = len(query)
    lengths = [len(c) for c in cands]
    lc_pad = max(padded(n) for n in lengths)
    per_cand = lc_pad * q.shape[0] * 4 / 2 ** 20
    group = max(1, int(float(budget_mb) // per_cand))
    counts, pairs = np.zeros(k_total, np.int64), []
    for g0 in range(0, k_total, group):
        idx = range(g0, min(k_total, g0 + group))
        c_np = np.zeros((len(idx), lc_pad, q.shape[1]), np.float32)
        for j, k in enumerate(idx):
            c_np[j, :lengths[k]] = cands[k]
        c = torch.from_numpy(c_np).to(dev)
        sim = torch.matmul(c, q.T)                                    # [G, Lc, Lq]
        sim[:, :, lq:] = -torch.inf
        valid = torch.arange(lc_pad, device=dev)[None] < torch.tensor([lengths[k] for k in idx], device=dev)[:, None]
        sim.masked_fill_(~valid[:, :, None], -torch.inf)
        row_arg = sim.argmax(2)                                       # best query token of each candidate row
        col_arg = sim.argmax(1)                                       # first best candidate row of each query token
        del sim
        mutual = valid & (col_arg.gather(1, row_arg) == torch.arange(lc_pad, device=dev)[None])
        # the official threshold test: the elementwise dot of the matched rows, not the GEMM value
        keep = mutual & ((q[row_arg] * c).sum(-1) > threshold)
        keep_np, row_np = keep.cpu().numpy(), row_arg.cpu().numpy()
        for j, k in enumerate(idx):
            ic = np.nonzero(keep_np[j])[0]
            jq = row_np[j][ic]
            order = np.argsort(jq, kind='stable')
            pairs.append((jq[order].astype(np.int64), ic[order].astype(np.int64)))
            counts[k] = len(ic)
    return Matches(counts, pairs)

"""Mutual nearest neighbours screened in bf16 and decided in fp32: the exact fp32 counts, faster (issue 14.2).

On CPUs with bf16 dot-product instructions (avx512_bf16, amx_bf16) a bf16 GEMM runs 3-4x faster than fp32. Its
values are off by a bounded amount, so it cannot decide a maximum by itself; it can say which few entries might
be one. Per candidate:

1. B = bf16(c) @ bf16(q)^T (fp32 accumulation, one rounding of the output to bf16), tiled into one buffer.
2. A rigorous bound E_i >= |B_ij - c_i.q_j| for every entry of row i (`entry_bound`): the inputs' rounding by
   Cauchy-Schwarz with the tokens' actual residual norms, the fp32 accumulation (Higham's gamma_128) and the output
   rounding (half an ulp of bf16 below 1).
3. Row i's fp32-GEMM argmax can only be an entry with B_ij >= max_j B_ij - 2 E_i - 2 gamma_i: about 4 of ~3,400
   columns on real tokens. Those are found on 64-column block maxima (bf16 compares as int16 for positive values)
   and evaluated in fp32 or better (float64 in the numba loops of `mutual_nn_jit`; numpy's fp32 einsum where
   numba is missing). When the best beats the second by more than the fp32 error of both evaluations, the
   fp32 GEMM has the same argmax; otherwise (a near tie, ~0.3 % of rows) the row is recomputed with the fp32 GEMM
   exactly as `mutual_nn` computes it, and the first maximum taken.
4. The same for the column of each row's best query token (the mutual test), among the rows within the bound of
   the column's bf16 maximum; near ties go to `mutual_nn`'s exact column recompute.
5. The official threshold test on the mutual pairs, as in `mutual_nn`.

Only rows that can still count are decided: a row whose bf16 maximum is below threshold - E_i - 2 x the official
dot margin can neither pass the threshold nor beat a pair that does in its column. The int16 view needs a positive
threshold (> 0.1): with a lower one, quirk A or non-finite tokens `match` runs the fp32 path instead.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fol_ros import mutual_nn
from fol_ros.mutual_nn import Matches, padded


BLOCK = 64                       # columns per block maximum (Lq is padded to a multiple of it)
TILE_ROWS = 1024                 # rows per bf16 GEMM call
WORKERS = 2                      # candidates decided at once (threads; see `match`)
MIN_THRESHOLD = 0.1
_NONE = np.iinfo(np.int64).max


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (x86 avx512_bf16 / amx_bf16; Arm bf16): otherwise torch
    emulates it, slower than fp32."""
    try:
        text = open('/proc/cpuinfo').read()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})


def gamma(n: int) -> float:
    """Higham's gamma_n for fp32: |computed - exact| <= gamma_n sum |a_k b_k| for an n-term dot product."""
    u = 2.0 ** -24
    return n * u / (1 - n * u)


def usable(query: np.ndarray, cands: Sequence[np.ndarray], threshold: float) -> bool:
    """Whether the bf16 screen applies: threshold > 0.1 and finite tokens."""
    return (threshold > MIN_THRESHOLD and len(query) > 0 and bool(np.isfinite(query).all())
            and all(np.isfinite(c).all() for c in cands))


def _as_float(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (int16) -> float32."""
    return (bits.astype(np.int32) << 16).view(np.float32)


def _bits_below(value: np.ndarray) -> np.ndarray:
    """int16 pattern of the largest bf16 <= value (value > 0): positive bf16 order like their int16 patterns."""
    return (np.asarray(value, np.float32).view(np.int32) >> 16).astype(np.int16)


def _norms(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum('ij,ij->i', a, a, dtype=np.float64))


def entry_bound(c_res: np.ndarray, c_norm: np.ndarray, cb_norm: np.ndarray, q_res: float, qb_norm: float,
                row_max: np.ndarray, dim: int) -> np.ndarray:
    """E_i >= |B_ij - c_i.q_j| for all j of row i (float64 [R]), from the tokens' norms (`token_norms`).

    c.q - c_b.q_b = (c - c_b).q_b + c.(q - q_b); the fp32 accumulation of c_b.q_b adds gamma |c_b| |q_b|; the output
    is rounded to bf16: half an ulp, 2^-9 below 1, 2^-8 in [1, 2) (row_max, the row's bf16 maximum, says which).
    """
    # a row maximum below 1.0 in bf16 means every product rounded below 1 (the largest bf16 below 1 is
    # 1 - 2^-8; products from the midpoint 1 - 2^-9 up round to 1.0): half an ulp is then at most 2^-9
    out_round = np.where(row_max < 1.0, 2.0 ** -9, 2.0 ** -8)
    return (c_res * qb_norm + c_norm * q_res + gamma(dim) * cb_norm * qb_norm) * (1 + 1e-3) + out_round + 1e-9


def token_norms(x: np.ndarray, x_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: |x - bf16(x)| (exact in fp32: the rounding drops low bits), |x|, and |x| + |x - bf16(x)| >=
    |bf16(x)|."""
    res, norm = _norms(x - x_b), _norms(x)
    return res, norm, norm + res


def _first_best(values: np.ndarray, index: np.ndarray, starts: np.ndarray, groups: int):
    """Per group (consecutive runs starting at `starts`): best value, first index reaching it, second best, and
    whether the best is reached more than once."""
    best = np.maximum.reduceat(values, starts)[:groups]
    at_best = values == np.repeat(best, np.diff(np.append(starts, len(values))))
    first = np.minimum.reduceat(np.where(at_best, index, _NONE), starts)[:groups]
    second = np.maximum.reduceat(np.where(at_best, -np.inf, values), starts)[:groups]
    ties = np.add.reduceat(at_best.astype(np.int64), starts)[:groups] > 1
    return best, first, second, ties


def _exact_dots(a: np.ndarray, ai: np.ndarray, b: np.ndarray, bi: np.ndarray) -> np.ndarray:
    return np.einsum('ij,ij->i', a[ai], b[bi]).astype(np.float64)


def _gemm_row_argmax(cand: torch.Tensor, q: torch.Tensor, rows: np.ndarray, query_len: int) -> np.ndarray:
    """First fp32-GEMM argmax of the given candidate rows, bit-identical to `mutual_nn`'s tiles (rows gathered
    and padded to ALIGN, never the 1-wide GEMV path)."""
    out = np.empty(len(rows), np.int64)
    step = 1024
    for r0 in range(0, len(rows), step):
        part = rows[r0:r0 + step]
        idx = np.zeros(padded(len(part)), np.int64)
        idx[:len(part)] = part
        sim = cand[torch.from_numpy(idx)] @ q.T
        out[r0:r0 + len(part)] = sim[:len(part), :query_len].argmax(1).numpy()
    return out


def _column_floor(col_blocks: np.ndarray, bound_max: float, gamma_max: float) -> np.ndarray:
    """int16 pattern per query column below which no candidate row can be its fp32-GEMM argmax (clamped to the
    smallest positive bf16: a column argmax that counts is positive)."""
    col_max = _as_float(col_blocks.max(0))
    return _bits_below(np.maximum(col_max - 2 * bound_max - 2 * gamma_max, np.float32(2.0 ** -126)))


def _row_candidates_numpy(bits: np.ndarray, block_max: np.ndarray, live: np.ndarray, floor: np.ndarray,
                          col_floor: np.ndarray, lq: int, c32: np.ndarray, q32: np.ndarray,
                          gap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`mutual_nn_jit.row_first_best` in numpy (without numba): the same (first, near)."""
    lc = len(block_max)
    first = np.full(lc, -1, np.int64)
    near = np.zeros(lc, bool)
    rows = np.nonzero(live)[0]
    bi, bj = np.nonzero(block_max[rows] >= floor[rows][:, None])    # candidate blocks, row-major
    blocks = bits[:lc].reshape(lc, -1, BLOCK)[rows[bi], bj]          # [n blocks, 64]
    k, col = np.nonzero(blocks >= floor[rows][bi][:, None])
    ri, cj = bi[k], bj[k] * BLOCK + col                               # candidate (row position, column), row-major
    inside = cj < lq
    ri, cj, b = ri[inside], cj[inside], blocks[k, col][inside]
    maybe = np.zeros(len(rows), bool)
    maybe[ri[b >= col_floor[cj]]] = True                             # rows with an entry that may be mutual
    keep = maybe[ri]
    ri, cj = ri[keep], cj[keep]
    rows_m = np.nonzero(maybe)[0]
    if len(rows_m) == 0:
        return first, near
    ri = np.searchsorted(rows_m, ri)                                  # positions among the rows kept
    rows = rows[rows_m]
    vals = _exact_dots(c32, rows[ri], q32, cj)
    starts = np.searchsorted(ri, np.arange(len(rows)))
    best, first[rows], second, ties = _first_best(vals, cj, starts, len(rows))
    near[rows] = ties | (best - second <= gap[rows])
    return first, near


def _row_argmax(bits: np.ndarray, lq: int, bound: np.ndarray, live: np.ndarray, c32: np.ndarray,
                q32: np.ndarray, cand_t: torch.Tensor, q_t: torch.Tensor, gamma_row: np.ndarray,
                block_max: np.ndarray, row_max: np.ndarray, col_floor: np.ndarray, compiled: bool) -> np.ndarray:
    """fp32-GEMM first argmax (query column) of each live row that can be mutual, -1 for the others.

    Row i's candidates are its entries >= floor_i = row max - 2 E_i - 2 gamma_i (64-column blocks whose maximum
    is below are skipped). A row can only be mutual if some column that may be its argmax also may have it as
    argmax: when every candidate entry lies below its column's floor (`col_floor`), whichever is the argmax, the
    row is not that column's argmax. Most rows end there, before any fp32 evaluation (~90 % on real tokens).
    fp32 einsum and fp32 GEMM are each within gamma |c||q| of the exact dot: a gap above 4 gamma decides; closer
    rows are recomputed with the fp32 GEMM."""
    floor = _bits_below(row_max - 2 * bound - 2 * gamma_row)    # rows not live: never read
    find = mutual_nn.JIT.row_first_best if compiled else _row_candidates_numpy
    arg, near = find(bits, block_max, live, floor, col_floor, lq, c32, q32, 4 * gamma_row)
    if near.any():
        rows = np.nonzero(near)[0]
        arg[rows] = _gemm_row_argmax(cand_t, q_t, rows, lq)
    return arg


def _column_candidates_numpy(bits: np.ndarray, col_blocks: np.ndarray, col_floor: np.ndarray, cols: np.ndarray,
                             c32: np.ndarray, q32: np.ndarray, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """`mutual_nn_jit.column_first_best` in numpy (without numba): the same (first, near)."""
    blocks_of = col_blocks[:, cols]                                  # [n row blocks, n cols]
    floor = col_floor[cols]
    rb, ci = np.nonzero(blocks_of >= floor[None, :])
    runs = bits.reshape(-1, BLOCK, bits.shape[1])[rb, :, cols[ci]]     # [n, BLOCK] rows of each candidate block
    k, off = np.nonzero(runs >= floor[ci][:, None])
    ri, ci = rb[k] * BLOCK + off, ci[k]
    order = np.lexsort((ri, ci))                                     # group by column, rows ascending
    ri, ci = ri[order], ci[order]
    vals = _exact_dots(c32, ri, q32, cols[ci])
    starts = np.searchsorted(ci, np.arange(len(cols)))
    best, first, second, ties = _first_best(vals, ri, starts, len(cols))
    return first, ties | (best - second <= gap)


def _column_first_argmax(bits: np.ndarray, col_blocks: np.ndarray, col_floor: np.ndarray, lc: int, cols: np.ndarray,
                         gamma_max: float, c32: np.ndarray, q32: np.ndarray, cand_t: torch.Tensor,
                         q_t: torch.Tensor, chunk: int, compiled: bool) -> np.ndarray:
    """fp32-GEMM first argmax (candidate row) of each query column in `cols`; col_blocks: maxima of `bits` over
    blocks of BLOCK rows [n blocks, Lq] (padding rows are zeros: never above a positive floor); col_floor:
    `_column_floor` of every column."""
    find = mutual_nn.JIT.column_first_best if compiled else _column_candidates_numpy
    first, near = find(bits, col_blocks, col_floor, cols, c32, q32, 4 * gamma_max)
    if near.any():
        first[near] = mutual_nn._first_argmax_of_columns(cand_t, lc, q_t, cols[near], chunk)
    return first


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (int16) of finite float32 values, rounded to nearest even (as torch converts). In numpy:
    on the node's frame-worker thread every small torch op pays an OpenMP wake-up (~0.4 ms here)."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((b + (0x7FFF + ((b >> 16) & 1))) >> 16).astype(np.uint16).view(np.int16)


def _bf16_tensor(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits).view(torch.bfloat16)


@dataclass(frozen=True)
class _Query:
    """What every candidate needs of the query."""

    q32: np.ndarray
    q_t: torch.Tensor
    q_b: torch.Tensor
    length: int
    res: float
    b_norm: float
    norm: float


def _candidate(query: _Query, cand: np.ndarray, threshold: float, chunk: int, sim: torch.Tensor, compiled: bool):
    """Mutual pairs (query rows, candidate rows, candidate token values) of one candidate before the threshold
    test, or None when its tokens are too far from unit norm for the int16 view (then the fp32 path runs)."""
    lc, lq, q32, dim = len(cand), query.length, query.q32, query.q32.shape[1]
    c32 = mutual_nn._fp32_padded(cand)
    cand_t = torch.from_numpy(c32)
    c_bits = bf16_bits(c32)
    c_b = _bf16_tensor(c_bits)
    n_pad, lq_pad = c32.shape[0], q32.shape[0]
    for r0 in range(0, n_pad, TILE_ROWS):
        r1 = min(n_pad, r0 + TILE_ROWS)
        torch.matmul(c_b[r0:r1], query.q_b.T, out=sim[r0:r1])
    bits_t = sim[:n_pad].view(torch.int16)
    bits = bits_t.numpy()
    block_max = bits_t[:lc].view(lc, -1, BLOCK).amax(2).numpy()
    col_blocks = bits.reshape(-1, BLOCK, lq_pad).max(1)
    row_max = _as_float(block_max.max(1))
    c_res, norm_c, cb_norm = token_norms(c32[:lc], _as_float(c_bits[:lc]))
    bound = entry_bound(c_res, norm_c, cb_norm, query.res, query.b_norm, row_max, dim)
    gamma_row = gamma(dim) * norm_c * query.norm * (1 + 1e-3) + 1e-12
    margin = mutual_nn.dot_margin(dim, query.norm, float(norm_c.max()))
    live = row_max >= threshold - bound - 2 * margin
    if not (row_max[live] - 2 * bound[live] - 2 * gamma_row[live] > 0).all():
        return None
    col_floor = _column_floor(col_blocks, float(bound.max()), float(gamma_row.max()))
    j = _row_argmax(bits, lq, bound, live, c32, q32, cand_t, query.q_t, gamma_row, block_max, row_max, col_floor,
                    compiled)
    ic = np.nonzero(j >= 0)[0]
    jq = j[ic]
    cols, where = np.unique(jq, return_inverse=True)
    if len(ic):
        owner = _column_first_argmax(bits, col_blocks, col_floor, lc, cols, float(gamma_row.max()), c32, q32, cand_t,
                                     query.q_t, chunk, compiled)
        mutual = owner[where] == ic
        ic, jq = ic[mutual], jq[mutual]
    return jq, ic, c32[ic]


def match(query: np.ndarray, cands: Sequence[np.ndarray], threshold: float, budget_mb: float,
          dev: torch.device = torch.device('cpu'), workers: int = WORKERS, compiled: bool | None = None) -> Matches:
    """Counted mutual-NN pairs of every candidate, equal to `mutual_nn.match` (fp32) by construction (module doc).

    compiled: decide rows and columns with the numba loops (`mutual_nn_jit`, default where numba imports) or with
    the numpy formulation; the same pairs either way.

    CPU only; needs `usable(...)`. Candidates run on `workers` threads: over half of each candidate's time is
    single-threaded (numpy and the numba loops, both without the GIL), so a second candidate keeps the other core
    busy. The workspace is one candidate's bf16 similarity matrix (23 MB at 3,400 tokens) per worker. Few torch
    calls per candidate (the bf16 GEMM tiles, one block maximum); the official threshold test runs once for all
    candidates at the end.
    """
    compiled = mutual_nn.use_compiled(compiled)
    q32 = mutual_nn._fp32_padded(query)
    q_bits = bf16_bits(q32)
    q_res, _, qb_norm = (float(v.max()) for v in token_norms(q32, _as_float(q_bits)))
    qry = _Query(q32, torch.from_numpy(q32), _bf16_tensor(q_bits), len(query), q_res, qb_norm,
                 mutual_nn._max_norm(q32))
    lq_pad = q32.shape[0]
    longest = max((padded(len(c)) for c in cands), default=mutual_nn.ALIGN)
    chunk = max(mutual_nn.ALIGN, mutual_nn.tile_rows(lq_pad, budget_mb) * lq_pad // longest
                // mutual_nn.ALIGN * mutual_nn.ALIGN)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    counts = np.zeros(len(cands), np.int64)
    pairs: list = [empty] * len(cands)
    todo = [k for k, c in enumerate(cands) if len(c)]
    buffers = [torch.empty((longest, lq_pad), dtype=torch.bfloat16) for _ in range(max(1, min(workers, len(todo))))]

    def run(slot: int) -> list:
        with torch.inference_mode():   # thread-local: the buffers were made under the caller's inference mode
            return [(k, _candidate(qry, cands[k], threshold, chunk, buffers[slot], compiled))
                    for k in todo[slot::len(buffers)]]
    if len(buffers) == 1:
        results = run(0)
    else:
        with ThreadPoolExecutor(len(buffers)) as pool:
            results = [r for part in pool.map(run, range(len(buffers))) for r in part]
    found = []     # (candidate, query rows, candidate rows, candidate token values) of the mutual pairs
    for k, got in sorted(results, key=lambda r: r[0]):
        if got is None:   # tokens far from unit norm: the bound reaches below zero; the fp32 path decides
            one = mutual_nn.match(query, [cands[k]], threshold, budget_mb, torch.device('cpu'))
            counts[k], pairs[k] = one.counts[0], one.pairs[0]
        elif len(got[0]):
            found.append((k, *got))
    if found:
        # the official threshold test, torch's elementwise dot of the matched rows (as `mutual_nn.match`), once
        iq_all = torch.from_numpy(np.concatenate([f[1] for f in found]))
        rows = torch.from_numpy(np.concatenate([f[3] for f in found]))
        keep_all = ((qry.q_t[iq_all] * rows).sum(-1) > threshold).numpy()
        at = 0
        for k, jq, ic, _ in found:
            keep = keep_all[at:at + len(jq)]
            at += len(jq)
            order = np.argsort(jq[keep], kind='stable')
            pairs[k] = (jq[keep][order], ic[keep][order])
            counts[k] = int(keep.sum())
    return Matches(counts, pairs)

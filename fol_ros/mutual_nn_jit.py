"""Compiled inner loops of the re-ranking kernels (numba; without it the callers do the same in numpy).

The bf16 screen (`mutual_nn_bf16`, steps 3-4): for each row (column) that can still count, the entries of the
bf16 similarity matrix at or above its floor, their dots evaluated in float64, and the first best of them with the
gap to the second best. The fp32 tiles (`mutual_nn`): each tile's column maxima and their first rows, folded in
one pass (numpy has no cheap first argmax along the columns, so without numba they are recomputed afterwards).

The same decisions as the numpy formulation in `mutual_nn_bf16` (kept for machines without numba): numpy needs a
gather of every candidate entry's token pair (~46k rows of 128 floats per candidate) and a dozen passes over
index arrays, which cost several times the bf16 GEMM itself on the node's frames; here each row is one pass
over its candidate blocks.

Exactness: float64 products of fp32 values are exact and a 128-term float64 sum (in any order: `reassoc` lets the
compiler vectorise it) is within 128 * 2^-53 of the exact dot, far inside the fp32 GEMM's gamma_128 that the
callers' gap test allows for twice over. Exact ties and gaps within that test are flagged `near` and decided by
the fp32 GEMM recompute in the caller. Serial, `nogil`: the caller already runs candidates on threads.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath={'reassoc', 'contract'})
def _dot(a: np.ndarray, b: np.ndarray) -> float:
    total = 0.0
    for t in range(a.shape[0]):
        total += np.float64(a[t]) * np.float64(b[t])
    return total


@numba.njit(cache=True, nogil=True)
def row_first_best(bits, block_max, live, floor, col_floor, query_len, c32, q32, gap):
    """First best query column of each live candidate row among its entries >= floor (evaluated in float64).

    Args:
        bits: int16 [rows, Lq_pad] bf16 similarity patterns (positive bf16 order like their int16 patterns).
        block_max: int16 [lc, Lq_pad / B] maxima of `bits` over blocks of B columns (B = Lq_pad / its width).
        live: bool [lc] rows to decide; floor: int16 [lc] per-row floor; col_floor: int16 [Lq_pad].
        gap: float64 [lc], a best closer than this to the second best is `near`.
    Returns:
        (first, near): int64 [lc], -1 for rows not decided (not live, or no candidate entry reaches its column's
        floor, so the row cannot be mutual); bool [lc], the row needs the fp32 GEMM recompute.
    """
    lc, n_blocks = block_max.shape
    width = bits.shape[1] // n_blocks
    first = np.full(lc, -1, np.int64)
    near = np.zeros(lc, np.bool_)
    cols = np.empty(bits.shape[1], np.int64)
    for i in range(lc):
        if not live[i]:
            continue
        fl = floor[i]
        n = 0
        maybe = False
        for b in range(n_blocks):
            if block_max[i, b] < fl:
                continue
            for j in range(b * width, min((b + 1) * width, query_len)):
                v = bits[i, j]
                if v >= fl:
                    cols[n] = j
                    n += 1
                    maybe |= v >= col_floor[j]
        if not maybe:
            continue
        best, second, arg, ties = -np.inf, -np.inf, -1, False
        for t in range(n):
            value = _dot(c32[i], q32[cols[t]])
            if value > best:
                best, second, arg, ties = value, best, cols[t], False
            elif value == best:
                ties = True
            elif value > second:
                second = value
        first[i] = arg
        near[i] = ties or best - second <= gap[i]
    return first, near


@numba.njit(cache=True, nogil=True)
def column_first_best(bits, col_blocks, col_floor, cols, c32, q32, gap):
    """First best candidate row of each query column in `cols` among its entries >= col_floor.

    Args:
        col_blocks: int16 [rows / B, Lq_pad] maxima of `bits` over blocks of B rows.
        gap: a best closer than this to the second best is `near`.
    Returns:
        (first, near): int64 [len(cols)], bool [len(cols)] (also near when no entry reached the floor).
    """
    n_blocks = col_blocks.shape[0]
    height = bits.shape[0] // n_blocks
    first = np.full(len(cols), -1, np.int64)
    near = np.ones(len(cols), np.bool_)
    for t in range(len(cols)):
        j = cols[t]
        fl = col_floor[j]
        best, second, arg, ties = -np.inf, -np.inf, -1, False
        for rb in range(n_blocks):
            if col_blocks[rb, j] < fl:
                continue
            for i in range(rb * height, (rb + 1) * height):
                if bits[i, j] < fl:
                    continue
                value = _dot(c32[i], q32[j])
                if value > best:
                    best, second, arg, ties = value, best, i, False
                elif value == best:
                    ties = True
                elif value > second:
                    second = value
        if arg >= 0:
            first[t] = arg
            near[t] = ties or best - second <= gap
    return first, near


@numba.njit(cache=True, nogil=True)
def fold_columns(tile, first_row, col_max, col_arg):
    """Fold the rows of `tile` [n, L] (rows first_row .. first_row + n - 1 of one candidate, in order) into its
    running column maxima and their FIRST rows (strict >: an equal value later never replaces the earlier row,
    numpy/torch argmax semantics). Branch-free selects, so the loop vectorises."""
    n, width = tile.shape
    for i in range(n):
        row = first_row + i
        for j in range(width):
            v = tile[i, j]
            better = v > col_max[j]
            col_arg[j] = row if better else col_arg[j]
            col_max[j] = v if better else col_max[j]

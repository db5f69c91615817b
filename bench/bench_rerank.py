"""Re-ranking cost on real tokens: fol_ros.rerank against the official dense formulation, same process, interleaved.

    .venv/bin/python bench/bench_rerank.py [--k 10 100] [--repeats 3] [--synthetic] [--faiss]

Tokens: the default ViT-S/14 at 322 on Corridor frames (query i against reference frames i.. i+K-1), stored in
fp16 exactly as a place map keeps them (`--synthetic` uses unit-norm random tokens with shared structure instead).
Methods, run interleaved (one repetition of each in turn) so background load hits them alike; medians reported:
* official: fol-method §9.2 written out: zero-padded to 3600, M = K x 3600 x 3600 at once, both argmaxes, a
  Python loop with nonzero() and the elementwise threshold (quirk A fixed, as in every method here: a single
  pair counts 1; it changes nothing in the timing);
* fused: `fol_ros.rerank.mutual_nn_counts(kernel='fp32')` (tiled fp32 GEMM, exact; each column's first best row
  kept while folding the tiles, fol_ros.mutual_nn_jit);
* fused-numpy: the same without numba (the columns carrying candidate pairs recomputed afterwards);
* bf16: `mutual_nn_counts(kernel='bf16')` (bf16 screen, every decision checked in fp32; fol_ros.mutual_nn_bf16),
  its rows and columns decided by the numba loops (fol_ros.mutual_nn_jit);
* bf16-numpy: the same screen with those decisions in numpy (the fallback without numba);
* faiss (--faiss): IndexFlatIP k=1 both ways on the same fp32 tokens (the GEMM twice; ties are faiss's own).
The FLOP bound is the fp32 one for every method (the bf16 kernel is faster than it where the CPU has bf16).
The FLOP bound is 2 * K * L_q * mean(L_c) * 128 at an fp32 GEMM rate measured in the same run on fused-sized tiles.
Workspace: the analytic size of what each method holds at once (similarity matrix or tile plus per-row results).
Writes bench/results/rerank-<host>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fol_ros import mutual_nn  # noqa: E402
from fol_ros.rerank import mutual_nn_counts  # noqa: E402

OFFICIAL_PAD = 3600
SHARED_DATA = Path(os.environ.get('FOL_ROS_SHARED_DATA', Path(__file__).resolve().parents[2] / 'shared' / 'data'))
CORRIDOR = SHARED_DATA / 'corridor'


def corridor_tokens(count: int) -> list[np.ndarray]:
    """fp16 local tokens of Corridor query frame 0 and reference frames 0..count-2 (default ViT-S/14 at 322)."""
    import cv2

    from fol_ros.encode.torch_engine import TorchEncoder
    from fol_ros.model.checkpoint import load_checkpoint
    from fol_ros.model.weights import ensure_default_checkpoint
    net, info = load_checkpoint(ensure_default_checkpoint())
    encoder = TorchEncoder(net, info, max_batch=8)
    refs = sorted((CORRIDOR / 'ref').glob('*.jpg'))
    paths = [CORRIDOR / 'query' / '0000000.jpg'] + [refs[i % len(refs)] for i in range(count - 1)]
    images = [cv2.imread(str(p))[:, :, ::-1].copy() for p in paths]
    return [e.local.astype(np.float16) for e in encoder.encode(images)]


def synthetic_tokens(count: int, n_tok: int = 3330, dim: int = 128) -> list[np.ndarray]:
    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)
    q = unit(rng.normal(size=(n_tok, dim)))
    out = [q]
    for _ in range(count - 1):
        share = int(n_tok * rng.uniform(0.0, 0.5))
        picked = q[rng.permutation(n_tok)[:share]].astype(np.float32)
        shared = picked + rng.uniform(0.1, 0.5) * rng.normal(size=picked.shape) / np.sqrt(dim) * 4
        out.append(unit(np.concatenate([shared, rng.normal(size=(n_tok - share, dim))])))
    return out


def official(q: np.ndarray, cands: list[np.ndarray], pad: int = OFFICIAL_PAD, threshold: float = 0.7) -> np.ndarray:
    """The official formulation (§9.2) written out: zero-padded, full K x pad x pad similarity, python loop."""
    fm1 = torch.zeros((pad, q.shape[1]))
    fm1[:len(q)] = torch.from_numpy(q.astype(np.float32))
    fm2 = torch.zeros((len(cands), pad, q.shape[1]))
    for i, c in enumerate(cands):
        fm2[i, :len(c)] = torch.from_numpy(c.astype(np.float32))
    m = torch.matmul(fm2, fm1.T)
    max1 = m.argmax(dim=1)
    max2 = m.argmax(dim=2)
    valid = max2.gather(1, max1) == torch.arange(pad)[None]
    scores = np.zeros(len(cands), np.int64)
    for k in range(len(cands)):
        idx1 = torch.nonzero(valid[k]).reshape(-1)
        idx2 = max1[k, idx1]
        sims = (fm1[idx1] * fm2[k, idx2]).sum(-1)
        scores[k] = int((sims > threshold).sum())
    return scores


def faiss_both_ways(q: np.ndarray, cands: list[np.ndarray], threshold: float = 0.7) -> np.ndarray:
    """Mutual NN with faiss IndexFlatIP k=1 in both directions."""
    import faiss
    qf = np.ascontiguousarray(q, np.float32)
    qi = faiss.IndexFlatIP(qf.shape[1])
    qi.add(qf)
    scores = np.zeros(len(cands), np.int64)
    for k, c in enumerate(cands):
        cf = np.ascontiguousarray(c, np.float32)
        ci = faiss.IndexFlatIP(cf.shape[1])
        ci.add(cf)
        _, best_c = ci.search(qf, 1)            # best candidate row of each query token
        sim, best_q = qi.search(cf, 1)          # best query token of each candidate row
        rows = np.arange(len(cf))
        mutual = best_c[best_q[:, 0], 0] == rows
        scores[k] = int((sim[mutual, 0] > threshold).sum())
    return scores


def gemm_gflops(lq: int, repeats: int = 3) -> float:
    """fp32 GEMM rate on fused-sized tiles [256, 128] x [128, Lq padded], best of `repeats` (GFLOP/s)."""
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.normal(size=(256, 128)).astype(np.float32))
    b = torch.from_numpy(rng.normal(size=(mutual_nn.padded(lq), 128)).astype(np.float32))
    out = torch.empty(256, b.shape[0])
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(40):
            torch.matmul(a, b.T, out=out)
        best = min(best, time.perf_counter() - t0)
    return 40 * 2 * 256 * b.shape[0] * 128 / best / 1e9


def workspace_mb(method: str, lq: int, lcs: list[int]) -> float:
    k = len(lcs)
    if method == 'official':
        return (k * OFFICIAL_PAD ** 2 * 4 + (k + 1) * OFFICIAL_PAD * 128 * 4) / 2 ** 20
    lqp = mutual_nn.padded(lq)
    rows = sum(mutual_nn.padded(n) for n in lcs)
    if method.startswith('bf16'):    # per worker thread: one candidate's bf16 similarities, its fp32 copy, block maxima
        from fol_ros.mutual_nn_bf16 import WORKERS
        longest = max(mutual_nn.padded(n) for n in lcs)
        per_worker = longest * lqp * 2 + longest * 128 * 4 + longest * lqp * 2 // 64 * 2
        return (min(WORKERS, k) * per_worker + lqp * 128 * 6) / 2 ** 20
    if method.startswith('fused'):   # tile + per-row max/argmax + per-candidate column maxima + query
        r = mutual_nn.tile_rows(lqp, 512.0)
        return (r * lqp * 4 + r * 128 * 4 + rows * 12 + k * lqp * 4 + lqp * 128 * 4) / 2 ** 20
    return (max(lcs) * 128 * 4 + lq * 128 * 4 + (lq + max(lcs)) * 16) / 2 ** 20   # faiss: one candidate at a time


def fused_numpy(q: np.ndarray, cands: list[np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return mutual_nn.match(q, cands, 0.7, 512.0, torch.device('cpu'), compiled=False).counts


def bf16_numpy(q: np.ndarray, cands: list[np.ndarray]) -> np.ndarray:
    from fol_ros import mutual_nn_bf16
    with torch.inference_mode():
        return mutual_nn_bf16.match(q, cands, 0.7, 512.0, compiled=False).counts


def run(args: argparse.Namespace) -> dict:
    tokens = (synthetic_tokens if args.synthetic else corridor_tokens)(max(args.k) + 1)
    q, refs = tokens[0], tokens[1:]
    methods = {'official': lambda c: official(q, c),
               'fused': lambda c: mutual_nn_counts(q, c, kernel='fp32'),
               'fused-numpy': lambda c: fused_numpy(q, c),
               'bf16': lambda c: mutual_nn_counts(q, c, kernel='bf16'),
               'bf16-numpy': lambda c: bf16_numpy(q, c)}
    if args.faiss:
        methods['faiss'] = lambda c: faiss_both_ways(q, c)
    rows = []
    for k in args.k:
        cands = refs[:k]
        lcs = [len(c) for c in cands]
        run_here = {m: f for m, f in methods.items()
                    if m != 'official' or workspace_mb(m, len(q), lcs) <= args.official_max_gb * 1024}
        times = {m: [] for m in run_here}
        counts = {}
        gflops = []
        for _ in range(args.repeats):   # interleaved: one of each per round
            gflops.append(gemm_gflops(len(q)))
            for m, fn in run_here.items():
                t0 = time.perf_counter()
                counts[m] = fn(cands)
                times[m].append((time.perf_counter() - t0) * 1e3)
        rate = statistics.median(gflops)
        bound_ms = 2 * len(q) * sum(lcs) * 128 / rate / 1e6
        ref = counts.get('official')
        row = {'k': k, 'query_tokens': len(q), 'mean_cand_tokens': round(float(np.mean(lcs)), 1),
               'gemm_gflops': round(rate, 1), 'fp32_bound_ms': round(bound_ms, 1),
               'load_average_1m': os.getloadavg()[0], 'mean_count': float(np.mean(counts['fused'])), 'methods': {}}
        for m in methods:
            entry = {'workspace_mb': round(workspace_mb(m, len(q), lcs), 1)}
            if m in times:
                ms = statistics.median(times[m])
                entry.update(ms=round(ms, 1), all_ms=[round(t, 1) for t in times[m]], x_bound=round(ms / bound_ms, 2),
                             speedup_vs_official=None if ref is None else
                             round(statistics.median(times['official']) / ms, 2),
                             counts_equal_official=None if ref is None else bool(np.array_equal(counts[m], ref)),
                             counts_equal_fused=bool(np.array_equal(counts[m], counts['fused'])))
            else:
                entry.update(ms=None, skipped=f'workspace above --official-max-gb {args.official_max_gb}')
            row['methods'][m] = entry
        rows.append(row)
        print(_lines(row), flush=True)
    return {'bench': 'rerank', 'tokens': 'synthetic' if args.synthetic else 'corridor vits14 322 fp16',
            'machine': machine(), 'repeats': args.repeats, 'rows': rows}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return {'host': platform.node(), 'cpu': cpu, 'torch_threads': torch.get_num_threads(),
            'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__,
            'utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            'load_average_1m_at_start': os.getloadavg()[0], 'cpu_count': os.cpu_count()}


HEADER = (f'{"K":>4} {"method":>11} {"ms":>8} {"x bound":>8} {"vs official":>12} {"workspace MB":>13} '
          f'{"counts = official":>18} {"= fused":>8}')


def _lines(r: dict) -> str:
    out = [f'K={r["k"]}: Lq {r["query_tokens"]}, mean Lc {r["mean_cand_tokens"]}, fp32 GEMM {r["gemm_gflops"]} '
           f'GFLOP/s -> bound {r["fp32_bound_ms"]} ms (load {r["load_average_1m"]:.1f})']
    for m, e in r['methods'].items():
        ms = '-' if e['ms'] is None else f'{e["ms"]:.0f}'
        xb = '-' if e['ms'] is None else f'{e["x_bound"]:.2f}'
        sp = '-' if e.get('speedup_vs_official') is None else f'{e["speedup_vs_official"]:.2f}x'
        out.append(f'{r["k"]:>4} {m:>11} {ms:>8} {xb:>8} {sp:>12} {e["workspace_mb"]:>13.0f} '
                   f'{str(e.get("counts_equal_official")):>18} {str(e.get("counts_equal_fused")):>8}')
    return '\n'.join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--k', type=int, nargs='+', default=[10, 100])
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--synthetic', action='store_true', help='random tokens instead of real Corridor ones')
    p.add_argument('--faiss', action='store_true', help='also time faiss IndexFlatIP k=1 both ways')
    p.add_argument('--official-max-gb', type=float, default=6.0, help='skip the official run above this workspace')
    p.add_argument('--out', default='')
    args = p.parse_args()
    print(HEADER)
    result = run(args)
    out = Path(args.out or Path(__file__).parent / 'results' / f'rerank-{platform.node()}.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

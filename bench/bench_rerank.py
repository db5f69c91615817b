"""Re-ranking cost: fol_ros.rerank (ragged, chunked) against the dense official K·L² formulation, same run.

    .venv/bin/python bench/bench_rerank.py [--tokens 3370] [--scaled-tokens 1024] [--k 10 50 100] [--device cpu]

Synthetic unit-norm fp16 tokens; each candidate shares a random fraction of the query's tokens (plus noise) so
scores are non-trivial. The dense formulation (fol-method §9.2) pads every token list to 3600 rows (scaled
proportionally for --scaled-tokens), builds M = K x Lpad x Lpad at once, takes both argmaxes and loops over K
with nonzero(); it is skipped where M would exceed --dense-max-gb. Both must give the same counts (quirk A
mirrored for the comparison). Writes bench/results/rerank-<host>.json and prints a table.
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
from fol_ros.rerank import mutual_nn_counts  # noqa: E402

OFFICIAL_PAD = 3600
TYPICAL_TOKENS = 3370   # expected selected tokens per image at 322x322 (fol-method §5)


def synthetic(rng: np.random.Generator, k: int, n_tok: int, dim: int = 128):
    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)
    q = unit(rng.normal(size=(n_tok, dim)))
    cands = []
    for _ in range(k):
        share = int(n_tok * rng.uniform(0.0, 0.5))
        picked = q[rng.permutation(n_tok)[:share]].astype(np.float32)
        shared = picked + rng.uniform(0.1, 0.5) * rng.normal(size=picked.shape) / np.sqrt(dim) * 4
        own = rng.normal(size=(n_tok - share, dim))
        cands.append(unit(np.concatenate([shared, own])))
    return q, cands


def dense_official(q: np.ndarray, cands: list[np.ndarray], pad: int, threshold: float = 0.7) -> np.ndarray:
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
        idx1 = torch.nonzero(valid[k]).squeeze()
        if idx1.dim() == 1:
            idx2 = max1[k, idx1]
            sims = (fm1[idx1] * fm2[k, idx2]).sum(-1)
            scores[k] = int((sims > threshold).sum())
    return scores


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for n_tok in (args.tokens, args.scaled_tokens):
        pad = int(round(n_tok * OFFICIAL_PAD / TYPICAL_TOKENS))
        for k in args.k:
            q, cands = synthetic(rng, k, n_tok)
            ours_ms, ours = timed(lambda: mutual_nn_counts(q, cands, budget_mb=args.budget_mb, device=args.device,
                                                           single_match_quirk=True), args.repeats)
            row = {'tokens': n_tok, 'pad': pad, 'k': k, 'ours_ms': round(ours_ms, 1),
                   'ours_workspace_mb': args.budget_mb, 'dense_workspace_mb': round(k * pad * pad * 4 / 2 ** 20),
                   'gflop_ours': round(2 * k * n_tok * n_tok * 128 / 1e9, 1),
                   'gflop_dense': round(2 * k * pad * pad * 128 / 1e9, 1), 'mean_score': float(np.mean(ours))}
            if k * pad * pad * 4 <= args.dense_max_gb * 2 ** 30:
                dense_ms, dense = timed(lambda: dense_official(q, cands, pad), args.repeats)
                row.update(dense_ms=round(dense_ms, 1), speedup=round(dense_ms / ours_ms, 2),
                           counts_agree=bool(np.array_equal(ours, dense)))
            else:
                row.update(dense_ms=None, speedup=None, counts_agree=None,
                           dense_skipped=f'M would need {k * pad * pad * 4 / 2 ** 30:.1f} GiB > --dense-max-gb')
            rows.append(row)
            print(_line(row), flush=True)
    return {'bench': 'rerank', 'machine': machine(), 'device': args.device, 'repeats': args.repeats, 'rows': rows}


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


HEADER = f'{"L":>5} {"pad":>5} {"K":>4} {"ours ms":>9} {"dense ms":>9} {"speedup":>8} {"dense MB":>9} {"agree":>6}'


def _line(r: dict) -> str:
    dense = '-' if r['dense_ms'] is None else f"{r['dense_ms']:.0f}"
    speed = '-' if r['speedup'] is None else f"{r['speedup']:.2f}"
    return (f"{r['tokens']:>5} {r['pad']:>5} {r['k']:>4} {r['ours_ms']:>9.0f} {dense:>9} {speed:>8} "
            f"{r['dense_workspace_mb']:>9} {str(r['counts_agree']):>6}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tokens', type=int, default=TYPICAL_TOKENS, help='real tokens per image')
    p.add_argument('--scaled-tokens', type=int, default=1024, help='second, scaled-down token count (all K dense)')
    p.add_argument('--k', type=int, nargs='+', default=[10, 50, 100])
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--budget-mb', type=float, default=512.0)
    p.add_argument('--dense-max-gb', type=float, default=1.0, help='skip the dense run above this M size')
    p.add_argument('--device', default='cpu')
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

"""Retrieval and map storage: search latency, recall of IVF/HNSW vs exact, bytes per place, map load time.

    .venv/bin/python bench/bench_search.py [--n 1000 10000 100000] [--approx-max 100000] [--map-n 1000 10000]

Synthetic 8448-d unit-norm global descriptors, clustered (a place seen from nearby poses looks alike) and
generated chunk by chunk so the 100k case holds one copy only; queries are noisy copies of map rows (revisits).
Latency = median over single-query searches (the node searches one frame at a time). Recall@K of an approximate
index = share of the exact top-K ids it returns. RAM per place = RSS growth while the index is built.
The map part writes real PlaceMap directories with synthetic tokens (full L at the first size, L/10 above it,
see --map-tokens) and measures bytes per place on disk, load time (sha256 verified and sizes only) and RAM.
Writes bench/results/search-<host>.json and prints tables.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_rerank import machine  # noqa: E402
from fol_ros.config import SearchConfig  # noqa: E402
from fol_ros.records import Encoding, ModelInfo  # noqa: E402
from fol_ros.search.index import ExclusionFilter, GlobalIndex  # noqa: E402
from fol_ros.search.place_map import PlaceMap  # noqa: E402

D = 8448
CHUNK = 10_000


def rss_bytes() -> int:
    with open('/proc/self/statm') as handle:
        return int(handle.read().split()[1]) * 4096


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Synthetic:
    """Deterministic clustered descriptors, regenerated per chunk."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed
        self.centres = np.random.default_rng(seed).normal(size=(max(10, n // 50), D)).astype(np.float32)

    def chunk(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        rows = min(CHUNK, self.n - i * CHUNK)
        labels = rng.integers(0, len(self.centres), rows)
        return _unit(self.centres[labels] + 0.9 * rng.normal(size=(rows, D)).astype(np.float32))

    def chunks(self):
        for i in range((self.n + CHUNK - 1) // CHUNK):
            yield self.chunk(i)

    def queries(self, q: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 10 ** 6])
        rows = rng.choice(self.n, q, replace=False)
        picked = np.stack([self.chunk(r // CHUNK)[r % CHUNK] for r in rows])
        return _unit(picked + 0.02 * rng.normal(size=picked.shape).astype(np.float32))


def index_bytes(index) -> int:
    """Bytes a faiss index holds for its vectors and graph/lists (structural count, not allocator slack)."""
    import faiss
    if isinstance(index, faiss.IndexHNSW):
        h = index.hnsw
        return index.ntotal * index.d * 4 + 4 * (h.neighbors.size() + h.levels.size()) \
            + 8 * h.offsets.size()
    if isinstance(index, faiss.IndexIVF):
        return index.ntotal * (index.code_size + 8) + index.nlist * index.d * 4
    return index.ntotal * index.code_size


def bench_index(data: Synthetic, kind: str, ks: list[int], queries: np.ndarray, exact: dict | None) -> dict:
    cfg = SearchConfig(index_type=kind, ivf_nlist=int(min(1024, 4 * np.sqrt(data.n))), ivf_nprobe=32)
    gc.collect()
    rss0, build_s = rss_bytes(), 0.0
    index = GlobalIndex(cfg, D)
    for i, chunk in enumerate(data.chunks()):
        t0 = time.perf_counter()
        (index.build if i == 0 else index.add)(chunk)   # IVF trains on the first chunk (<= 10k rows)
        build_s += time.perf_counter() - t0
    del chunk
    gc.collect()
    row = {'n': data.n, 'index': kind, 'build_s': round(build_s, 2),
           'index_bytes_per_place': round(index_bytes(index._index) / data.n),
           'rss_growth_bytes_per_place': round((rss_bytes() - rss0) / data.n)}
    if kind == 'ivf':
        row['nlist'] = index._index.nlist
    ids_at = {}
    for k in ks:
        times = []
        for q in queries:
            t = time.perf_counter()
            ids, _ = index.search(q, k)
            times.append((time.perf_counter() - t) * 1e3)
            ids_at.setdefault(k, []).append(ids[0])
        row[f'search_ms_k{k}'] = round(statistics.median(times), 2)
        if exact is not None:
            row[f'recall_at_{k}'] = round(float(np.mean([len(set(a) & set(e)) / k
                                                         for a, e in zip(ids_at[k], exact[k])])), 4)
    flt = ExclusionFilter(last_n=data.n // 10, near_id=0, near_radius=5)
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q, max(ks), exclude=flt)
        times.append((time.perf_counter() - t) * 1e3)
    row[f'filtered_search_ms_k{max(ks)}'] = round(statistics.median(times), 2)
    del index
    gc.collect()
    return row, ids_at


def bench_map(n: int, tokens: int, tmp: Path) -> dict:
    rng = np.random.default_rng(1)
    pool = [(rng.normal(size=(tokens, 128)) / np.sqrt(128)).astype(np.float16) for _ in range(8)]
    xy = rng.uniform(0, 640, (tokens, 2)).astype(np.float32)
    index = np.arange(tokens, dtype=np.int32)
    model = ModelInfo('vits14', (322, 322), '0' * 64, 'bench')
    pmap = PlaceMap.create(model)
    globals_ = _unit(rng.normal(size=(64, D)))
    for i in range(n):
        pmap.add(Encoding(globals_[i % 64], pool[i % 8], index, xy, (89, 89), (480, 640)), i * 10 ** 8)
    path = tmp / f'map{n}'
    t0 = time.perf_counter()
    pmap.save(path)
    save_s = time.perf_counter() - t0
    del pmap
    gc.collect()
    disk = {f.name: f.stat().st_size for f in path.iterdir()}
    tracemalloc.start()   # numpy reports its buffers to tracemalloc; memory-mapped tokens are not RAM
    t0 = time.perf_counter()
    loaded = PlaceMap.load(path, verify='full')
    full_s = time.perf_counter() - t0
    ram = tracemalloc.get_traced_memory()[0] / n
    tracemalloc.stop()
    del loaded
    gc.collect()
    t0 = time.perf_counter()
    PlaceMap.load(path, verify='size')
    size_s = time.perf_counter() - t0
    shutil.rmtree(path)
    return {'n': n, 'tokens_per_place': tokens, 'save_s': round(save_s, 2),
            'disk_bytes_per_place': round(sum(disk.values()) / n),
            'disk_bytes_per_place_by_file': {k: round(v / n) for k, v in sorted(disk.items())},
            'load_s_sha256': round(full_s, 3), 'load_s_sizes_only': round(size_s, 3),
            'ram_bytes_per_place_after_load': round(ram)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, nargs='+', default=[1000, 10000, 100000])
    p.add_argument('--k', type=int, nargs='+', default=[10, 50, 100])
    p.add_argument('--queries', type=int, default=20)
    p.add_argument('--ivf-max', type=int, default=100000, help='largest N for which IVF is built')
    p.add_argument('--hnsw-max', type=int, default=10000,
                   help='largest N for which HNSW is built (8448-d HNSW at 100k takes ~10 min on 2 cores)')
    p.add_argument('--map-n', type=int, nargs='*', default=[1000, 10000])
    p.add_argument('--map-tokens', type=int, nargs='*', default=[3370, 337], help='tokens per place per --map-n')
    p.add_argument('--omp-threads', type=int, default=0, help='faiss OpenMP threads (0 = faiss default)')
    p.add_argument('--out', default='')
    args = p.parse_args()
    if args.omp_threads:
        import faiss
        faiss.omp_set_num_threads(args.omp_threads)
    rows, maps = [], []
    print(f'{"N":>7} {"index":>5} {"build s":>8} ' + ' '.join(f'{"ms@" + str(k):>7}' for k in args.k)
          + f' {"filt ms":>8} ' + ' '.join(f'{"R@" + str(k):>6}' for k in args.k) + f' {"idx B/pl":>9}')
    for n in args.n:
        data = Synthetic(n)
        queries = data.queries(args.queries)
        exact = None
        for kind in ('flat', 'ivf', 'hnsw'):
            if n > {'flat': n, 'ivf': args.ivf_max, 'hnsw': args.hnsw_max}[kind]:
                continue
            row, ids = bench_index(data, kind, args.k, queries, exact)
            exact = ids if kind == 'flat' else exact
            rows.append(row)
            print(f'{n:>7} {kind:>5} {row["build_s"]:>8.1f} '
                  + ' '.join(f'{row[f"search_ms_k{k}"]:>7.2f}' for k in args.k)
                  + f' {row[f"filtered_search_ms_k{max(args.k)}"]:>8.2f} '
                  + ' '.join(f'{row.get(f"recall_at_{k}", 1.0):>6.3f}' for k in args.k)
                  + f' {row["index_bytes_per_place"]:>9}', flush=True)
    with tempfile.TemporaryDirectory(prefix='fol_bench_') as tmp:
        for n, tokens in zip(args.map_n, args.map_tokens):
            maps.append(bench_map(n, tokens, Path(tmp)))
            m = maps[-1]
            print(f'map N={n} L={tokens}: {m["disk_bytes_per_place"]} B/place on disk, load {m["load_s_sha256"]} s '
                  f'(sha256) / {m["load_s_sizes_only"]} s (sizes), RAM {m["ram_bytes_per_place_after_load"]} B/place, '
                  f'save {m["save_s"]} s', flush=True)
    out = Path(args.out or Path(__file__).parent / 'results' / f'search-{platform.node()}.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'bench': 'search', 'machine': machine(), 'dim': D, 'queries': args.queries,
                               'omp_threads': args.omp_threads or 'faiss default',
                               'index_rows': rows, 'maps': maps}, indent=2) + '\n')
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

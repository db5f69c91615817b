"""Scale numbers (issue 17.3): search latency and recall@10 against exact search at 10k, 100k and 1M places of real
8448-d FoL global descriptors, for faiss flat, IVF and HNSW (the node's own `GlobalIndex`), IVF-PQ (what fits at 1M),
IVF-SQ8 (`faiss-ivfsq8`, 8-bit codes: 8.4 GB at 1M), flat over fp16 copies (`faiss-flat-fp16`, 16.9 GB at 1M)
and any other back end;
RAM and disk per place.

    .venv/bin/python bench/bench_scale.py [--n 10000 100000 1000000] [--backends faiss-flat faiss-ivf faiss-hnsw]
                                          [--backend-module my.module:factory] [--ram-gb 12]

Places: the real global descriptors of Corridor and the demo route (both traversals, token_sets.py) repeated with
Gaussian noise (noise norm 0.5 before re-normalisation: a copy has cosine ~0.89 to its source), generated chunk by
chunk from a seed, so the same N always gives the same places. Queries: 100 real descriptors with fresh noise.
Exact top-10 (the reference for recall) is computed by streaming the chunks through an fp32 inner product, so it
never needs the whole matrix in RAM. A back end whose fp32 vectors do not fit in --ram-gb (1M x 8448 x 4 B = 34 GB)
is skipped and reported as such, never shrunk to fewer dimensions.
Latency: median of single-query searches (the node searches one frame at a time), faiss on one OpenMP thread.
Disk per place: the saved index (faiss.write_index) / N, plus the map's own bytes per place for each token encoding
(bench_tokens.py). RAM per place: the in-memory index / N (faiss serialises its arrays one to one).

Other back ends (the fleet database of issue 17.2) plug in with --backend-module MODULE:FACTORY: FACTORY(dim) returns
an object with add(vectors float32 [n, d], ids int64 [n]), search(queries [q, d], k) -> ids int64 [q, k],
ram_bytes() and disk_bytes() (None when unknown) and optionally close(); it is measured in the same run and table.
Prints a table, writes bench/results/scale.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))
import token_sets  # noqa: E402

CHUNK = 10_000
NOISE = 0.5
QUERIES = 100
K = 10


def real_descriptors() -> np.ndarray:
    parts = []
    for name in ('corridor', 'demo'):
        ts = token_sets.load(name)
        parts += [ts.ref.globals, ts.query.globals]
    return np.concatenate(parts).astype(np.float32)


def _noisy(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = src + rng.standard_normal(src.shape, np.float32) * np.float32(NOISE / np.sqrt(src.shape[1]))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def chunks(real: np.ndarray, n: int):
    """(first id, float32 [c, d]) chunks of the n synthetic places, deterministic."""
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        rng = np.random.default_rng(start)
        yield start, _noisy(real[np.arange(start, stop) % len(real)], rng)


def queries(real: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(12345)
    return _noisy(real[rng.choice(len(real), QUERIES, replace=False)], rng)


def exact_top(real: np.ndarray, n: int, q: np.ndarray) -> np.ndarray:
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.full((len(q), K), -1, np.int64)
    for start, x in chunks(real, n):
        s = q @ x.T
        s_all = np.concatenate([best_s, s], 1)
        i_all = np.concatenate([best_i, np.arange(start, start + len(x))[None].repeat(len(q), 0)], 1)
        pick = np.argsort(-s_all, 1, kind='stable')[:, :K]
        best_s, best_i = np.take_along_axis(s_all, pick, 1), np.take_along_axis(i_all, pick, 1)
    return best_i


class FaissBackend:
    """The node's GlobalIndex with one index type."""

    def __init__(self, dim: int, index_type: str, nlist: int, nprobe: int, hnsw_m: int, ef: int) -> None:
        from fol_ros.config import SearchConfig
        from fol_ros.search.index import GlobalIndex
        self.config = SearchConfig(index_type=index_type, ivf_nlist=nlist, ivf_nprobe=nprobe, hnsw_m=hnsw_m,
                                   hnsw_ef_search=ef)
        self.index = GlobalIndex(self.config, dim)
        self.parts: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.parts.append(vectors)
        self.ids.append(ids)

    def finish(self) -> None:   # IVF trains on the whole set, as GlobalIndex.build does for a map
        matrix = np.concatenate(self.parts)
        ids = np.concatenate(self.ids)
        self.parts, self.ids = [], []
        self.index.build(matrix, ids, np.zeros(len(ids), np.int64))

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(q, k)[0]

    def _bytes(self) -> int:
        import faiss
        return int(faiss.serialize_index(self.index._index).size)

    def ram_bytes(self) -> int:
        return self._bytes()

    def disk_bytes(self) -> int:
        return self._bytes()


class IvfCodesBackend:
    """faiss IVF over compressed vectors, what fits at 1M: IndexIVFPQ (8448 / 32 = 264 bytes per place) or
    IndexIVFScalarQuantizer with 8-bit codes (8,448 bytes per place, 8.4 GB at 1M), trained on the first chunks.
    Built in two passes over the (regenerated) chunks so that neither the fp32 vectors nor growing lists are ever
    all in RAM: pass 1 assigns every place to its list, each list is then sized exactly once, pass 2 encodes the
    chunks and writes each list's entries in place (appending chunk by chunk doubled the lists' buffers: the 8.4 GB
    of SQ8 codes peaked above 23 GB). Not node index types (GlobalIndex has flat/ivf/hnsw)."""

    def __init__(self, dim: int, nlist: int, nprobe: int, codes: str = 'pq', m: int = 264,
                 train: int = 40_000) -> None:
        import faiss
        self.faiss, self.dim, self.train_n, self.nlist = faiss, dim, train, nlist
        self.coarse = faiss.IndexFlatIP(dim)   # the IVF index does not own it
        self.codes, self.m, self.nprobe = codes, m, nprobe
        self.ivf = None

    def _make(self, nlist: int):
        faiss = self.faiss
        if self.codes == 'pq':
            return faiss.IndexIVFPQ(self.coarse, self.dim, nlist, self.m, 8, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIVFScalarQuantizer(self.coarse, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                             faiss.METRIC_INNER_PRODUCT)

    def build(self, make_chunks) -> None:
        faiss = self.faiss
        sample, lists = [], []
        for _, x in make_chunks():                      # pass 1: train on the first chunks, assign every place
            if self.ivf is None:
                sample.append(x)
                if sum(len(v) for v in sample) < self.train_n:
                    continue
                x_train = np.concatenate(sample)[:self.train_n]
                self.ivf = self._make(min(self.nlist, max(1, len(x_train) // 39)))
                self.ivf.train(x_train)
                for v in sample:
                    lists.append(self.coarse.search(v, 1)[1][:, 0])
                sample = []
                continue
            lists.append(self.coarse.search(x, 1)[1][:, 0])
        if self.ivf is None:                            # fewer places than the training sample
            x_train = np.concatenate(sample)
            self.ivf = self._make(min(self.nlist, max(1, len(x_train) // 39)))
            self.ivf.train(x_train)
            lists = [self.coarse.search(x_train, 1)[1][:, 0]]
        list_of = np.concatenate(lists).astype(np.int64)
        # serialising the filled index would copy it (8.4 GB at 1M, more while the copy grows): measure the
        # trained, empty one and add what each entry stores (its code and its 8-byte id)
        self.empty_bytes = int(faiss.serialize_index(self.ivf).size)
        invlists = self.ivf.invlists
        for lst, size in enumerate(np.bincount(list_of, minlength=self.ivf.nlist)):
            invlists.resize(lst, int(size))
        cursor = np.zeros(self.ivf.nlist, np.int64)
        code_size = self.ivf.code_size
        for start, x in make_chunks():                  # pass 2: encode, write each list's entries in place
            nos = np.ascontiguousarray(list_of[start:start + len(x)])
            codes = np.empty((len(x), code_size), np.uint8)
            self.ivf.encode_vectors(len(x), faiss.swig_ptr(x), faiss.swig_ptr(nos), faiss.swig_ptr(codes))
            ids = np.arange(start, start + len(x), dtype=np.int64)
            order = np.argsort(nos, kind='stable')
            bounds = np.flatnonzero(np.diff(nos[order])) + 1
            for part in np.split(order, bounds):
                lst, idx = int(nos[part[0]]), np.ascontiguousarray(ids[part])
                block = np.ascontiguousarray(codes[part])
                invlists.update_entries(lst, int(cursor[lst]), len(part), faiss.swig_ptr(idx), faiss.swig_ptr(block))
                cursor[lst] += len(part)
        self.ivf.ntotal = len(list_of)
        self.ivf.nprobe = self.nprobe

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.ivf.search(q, k)[1]

    def ram_bytes(self) -> int:
        return self.empty_bytes + int(self.ivf.ntotal) * (self.ivf.code_size + 8)

    disk_bytes = ram_bytes


class Fp16FlatBackend:
    """Exact (brute-force) inner product over fp16 copies of the vectors (faiss IndexScalarQuantizer QT_fp16): half
    the RAM of flat fp32 (16.9 GB at 1M), what fits a flat index at 1M on a 24 GB machine. The code array is sized
    once for all n places and filled chunk by chunk (growing it by appends would hold the old and the doubled
    buffer at once, ~2x the codes). Not a node index type."""

    def __init__(self, dim: int, n: int) -> None:
        import faiss
        self.faiss = faiss
        self.index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        self.code_size = self.index.code_size
        self.index.codes.resize(n * self.code_size)
        self.codes = faiss.rev_swig_ptr(self.index.codes.data(), n * self.code_size).reshape(n, self.code_size)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:   # ids are 0..n-1 in order (run_one)
        self.codes[ids] = self.index.sa_encode(vectors)
        self.index.ntotal = int(ids[-1]) + 1

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(q, k)[1]

    def ram_bytes(self) -> int:
        return int(self.index.ntotal * self.code_size)

    disk_bytes = ram_bytes   # faiss.write_index stores the codes as they are (+ a header)


def _external(spec: str, dim: int):
    module, _, name = spec.partition(':')
    return getattr(importlib.import_module(module), name or 'create')(dim)


def run_one(name: str, backend, real: np.ndarray, n: int, q: np.ndarray, truth: np.ndarray) -> dict:
    t0 = time.perf_counter()
    if hasattr(backend, 'build'):   # builds from the chunks itself (may pass over them twice)
        backend.build(lambda: chunks(real, n))
    else:
        for start, x in chunks(real, n):
            backend.add(x, np.arange(start, start + len(x), dtype=np.int64))
        if hasattr(backend, 'finish'):
            backend.finish()
    build = time.perf_counter() - t0
    lat, found = [], []
    for row in q:
        t0 = time.perf_counter()
        ids = backend.search(row[None], K)
        lat.append((time.perf_counter() - t0) * 1e3)
        found.append(np.asarray(ids).reshape(-1)[:K])
    recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)]))
    ram, disk = backend.ram_bytes(), backend.disk_bytes()
    if hasattr(backend, 'close'):
        backend.close()
    return {'places': n, 'backend': name, 'build_s': round(build, 1), 'ms_p50': round(statistics.median(lat), 2),
            'ms_p90': round(float(np.percentile(lat, 90)), 2), 'recall_at_10': recall,
            'ram_bytes_per_place': None if ram is None else ram / n,
            'disk_bytes_per_place': None if disk is None else disk / n, 'load_average_1m': os.getloadavg()[0]}


def _token_bytes() -> dict:
    """Map bytes per place by token encoding, from bench_tokens' last run (Corridor), when there is one."""
    path = REPO / 'bench' / 'results' / 'tokens.json'
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    rows = next((r for r in data['results'] if r['set'] == 'corridor'), None)
    return {} if rows is None else {k: v['mb_per_place'] * 1e6 for k, v in rows['settings'].items()
                                    if v['mb_per_place'] is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, nargs='+', default=[10_000, 100_000, 1_000_000])
    p.add_argument('--backends', nargs='+', default=['faiss-flat', 'faiss-ivf', 'faiss-hnsw', 'faiss-ivfpq'],
                   choices=['faiss-flat', 'faiss-ivf', 'faiss-hnsw', 'faiss-ivfpq', 'faiss-ivfsq8',
                            'faiss-flat-fp16'])
    p.add_argument('--backend-module', action='append', default=[],
                   help='MODULE:FACTORY of another back end (see the module doc); repeatable')
    p.add_argument('--hnsw-max', type=int, default=10_000, help='HNSW only up to this many places (build time)')
    p.add_argument('--ram-gb', type=float, default=12.0, help='skip back ends whose vectors need more RAM than this')
    p.add_argument('--nlist', type=int, default=1024)
    p.add_argument('--nprobe', type=int, default=32)
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'scale.json'))
    p.add_argument('--merge', action='store_true', help='keep the rows of --out for other (places, back end) pairs '
                   '(e.g. add a 1M run to an earlier 10k/100k one)')
    args = p.parse_args()
    import faiss
    faiss.omp_set_num_threads(1)
    real = real_descriptors()
    dim = real.shape[1]
    q = queries(real)
    rows = []
    print(f"{'places':>9} {'backend':>12} {'build s':>8} {'ms p50':>8} {'ms p90':>8} {'recall@10':>9} "
          f"{'RAM B/place':>12} {'disk B/place':>12}", flush=True)
    for n in args.n:
        t0 = time.perf_counter()
        truth = exact_top(real, n, q)
        print(f'  exact top-{K} of {QUERIES} queries over {n} places: {time.perf_counter() - t0:.0f} s',
              file=sys.stderr, flush=True)
        specs = [(b, None) for b in args.backends] + [(m, m) for m in args.backend_module]
        for name, module in specs:
            need = n * dim * 4 * (2 if name != 'faiss-hnsw' else 2.1)   # vectors + the copy taken while building
            if name == 'faiss-ivfpq':
                need = n * 300 + CHUNK * dim * 8 + args.nlist * dim * 4
            elif name == 'faiss-flat-fp16':
                need = n * dim * 2 + CHUNK * dim * 8
            elif name == 'faiss-ivfsq8':   # the codes, sized once, and a chunk
                need = n * (dim + 16) + CHUNK * dim * 16 + args.nlist * dim * 4
            if module is None and need > args.ram_gb * 2 ** 30:
                rows.append({'places': n, 'backend': name, 'skipped': f'needs ~{need / 2 ** 30:.0f} GB of RAM '
                             f'(--ram-gb {args.ram_gb})'})
                print(f'{n:>9} {name:>12}  skipped: {rows[-1]["skipped"]}', flush=True)
                continue
            if name == 'faiss-hnsw' and n > args.hnsw_max:
                rows.append({'places': n, 'backend': name, 'skipped': f'HNSW build above --hnsw-max {args.hnsw_max}'})
                print(f'{n:>9} {name:>12}  skipped: {rows[-1]["skipped"]}', flush=True)
                continue
            if module:
                backend = _external(module, dim)
            elif name == 'faiss-flat-fp16':
                backend = Fp16FlatBackend(dim, n)
            elif name in ('faiss-ivfpq', 'faiss-ivfsq8'):
                backend = IvfCodesBackend(dim, args.nlist, args.nprobe, name.removeprefix('faiss-ivf'))
            else:
                backend = FaissBackend(dim, name.split('-')[1], args.nlist, args.nprobe, 32, 128)
            r = run_one(name, backend, real, n, q, truth)
            rows.append(r)
            ram = '-' if r['ram_bytes_per_place'] is None else f"{r['ram_bytes_per_place']:.0f}"
            disk = '-' if r['disk_bytes_per_place'] is None else f"{r['disk_bytes_per_place']:.0f}"
            print(f"{n:>9} {name:>12} {r['build_s']:>8.1f} {r['ms_p50']:>8.2f} {r['ms_p90']:>8.2f} "
                  f"{r['recall_at_10']:>9.3f} {ram:>12} {disk:>12}", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.exists():
        done = {(r['places'], r['backend']) for r in rows}
        earlier = [r for r in json.loads(out.read_text())['rows'] if (r['places'], r['backend']) not in done]
        rows = sorted(earlier + rows, key=lambda r: r['places'])
    out.write_text(json.dumps({'bench': 'scale', 'utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                               'dim': dim, 'real_descriptors': len(real), 'noise_norm': NOISE, 'queries': QUERIES,
                               'nlist': args.nlist, 'nprobe': args.nprobe, 'cpu_count': os.cpu_count(),
                               'map_bytes_per_place_by_tokens': _token_bytes(), 'rows': rows}, indent=1) + '\n')
    print(f'wrote {out}')


if __name__ == '__main__':
    main()

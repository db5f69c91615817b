"""What loading the saved index (index.faiss, written by `fol-ros map build --index`) saves at node configure.

    .venv/bin/python bench/bench_map_store.py [--n 10000 100000] [--rounds 2] [--hnsw-max 10000]

For each map size a real PlaceMap directory is written (synthetic clustered 8448-d descriptors from
bench_search.Synthetic, one 128-d token per place: tokens do not matter here) and its IVF/HNSW index saved the
way map build does. Then, interleaved in the same process, `GlobalIndex.for_map` as the node calls it (load the
saved index when it fits: sizes + sha256 checked, then faiss.read_index) and the same with the saved index
ignored (rebuild, what the node did before). Medians over --rounds. Flat is always built (copying the descriptors
already in RAM); its row shows what reading a saved flat index would cost instead. The map load itself
(PlaceMap.load, sha256 of every file) is reported beside it, since configure pays both.
Writes bench/results/map_store-<host>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_rerank import machine  # noqa: E402
from bench.bench_search import CHUNK, Synthetic  # noqa: E402
from fol_ros.config import SearchConfig  # noqa: E402
from fol_ros.records import Encoding, ModelInfo  # noqa: E402
from fol_ros.search.index import GlobalIndex  # noqa: E402
from fol_ros.search.place_map import PlaceMap  # noqa: E402

MODEL = ModelInfo('vits14', (322, 322), 'ab' * 32, 'bench_map_store synthetic')


def make_map(path: Path, n: int) -> float:
    """A saved map of `n` synthetic places; returns the seconds it took."""
    t0 = time.perf_counter()
    pmap = PlaceMap.create(MODEL)
    data = Synthetic(n)
    token = np.ones((1, 128), np.float32) / np.sqrt(128)
    for c in range((n + CHUNK - 1) // CHUNK):
        for g in data.chunk(c):
            pmap.add(Encoding(g, token, np.zeros(1, np.int32), np.zeros((1, 2), np.float32), (23, 23), (322, 322)),
                     len(pmap) * 10 ** 9)
    pmap.save(path, tool='bench_map_store')
    return time.perf_counter() - t0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, nargs='+', default=[10_000, 100_000])
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--hnsw-max', type=int, default=10_000, help='largest map to run HNSW on (slow to build)')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / f'map_store-{platform.node()}.json'))
    args = ap.parse_args()
    rows = []
    root = Path(tempfile.mkdtemp(prefix='bench_map_store-'))
    try:
        for n in args.n:
            path = root / f'map{n}'
            made = make_map(path, n)
            map_load = statistics.median(timed(lambda: PlaceMap.load(path)) for _ in range(args.rounds))
            pmap = PlaceMap.load(path)
            print(f'{n} places: map written in {made:.1f} s, PlaceMap.load (sha256) {map_load:.2f} s', flush=True)
            kinds = ['flat', 'ivf'] + (['hnsw'] if n <= args.hnsw_max else [])
            for kind in kinds:
                cfg = SearchConfig(index_type=kind)
                saved = path / 'index.faiss'
                if kind == 'flat':   # never saved by map build; what reading one would cost
                    faiss.write_index(GlobalIndex.for_map(pmap, cfg)._index, str(saved))
                    load = lambda: faiss.read_index(str(saved))  # noqa: E731
                else:
                    write_s = timed(lambda: GlobalIndex.for_map(pmap, cfg, write=True))
                    load = lambda: GlobalIndex.for_map(pmap, cfg, write=False)  # noqa: E731
                build = lambda: GlobalIndex.for_map(pmap, cfg, cache=False)  # noqa: E731
                loads, builds = [], []
                for _ in range(args.rounds):
                    loads.append(timed(load))
                    builds.append(timed(build))
                row = {'places': n, 'index': kind, 'build_s': statistics.median(builds),
                       'load_s': statistics.median(loads), 'map_load_s': map_load,
                       'index_bytes': saved.stat().st_size, 'rounds': args.rounds,
                       'build_and_save_s': None if kind == 'flat' else write_s}
                row['saved_s'] = row['build_s'] - row['load_s']
                rows.append(row)
                print(json.dumps(row), flush=True)
                saved.unlink()
                saved.with_suffix('.json').unlink(missing_ok=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print('\n| places | index | rebuild s | load saved s | saved at configure s | map load (sha256) s | '
          'index MB |\n|---|---|---|---|---|---|---|')
    for r in rows:
        load_note = ' (read_index; not used)' if r['index'] == 'flat' else ''
        print(f"| {r['places']:,} | {r['index']} | {r['build_s']:.2f} | {r['load_s']:.2f}{load_note} | "
              f"{r['saved_s']:+.2f} | {r['map_load_s']:.2f} | {r['index_bytes'] / 1e6:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'machine': machine(), 'rows': rows, 'args': vars(args)}, indent=2))
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Compact local tokens (issue 17.1): MB per place, re-ranked recall, top-1 agreement with the fp32 re-ranker and
re-rank time for each token encoding of a map.

    .venv/bin/python bench/bench_tokens.py [--sets corridor demo] [--step 1] [--k 10] [--settings fp16 int8 pq32]

Data: real encodings (default model, token_sets.py: Corridor ref/query with its ground truth; the demo route's two
traversals, correct within 3 m). For every setting the reference traversal is written as a real map
(`PlaceMap.save(tokens=...)`, PQ trained on the map's own tokens) and loaded back; MB per place is the map
directory's size on disk / places (everything: descriptors, tokens, token grid index and pixel coordinates, codec).
Each query's top-K map places by exact global similarity (the same for every setting) are re-ranked by
`fol_ros.rerank.rerank_candidates` reading the tokens through `PlaceMap.local_tokens` (decode included); the
baseline is the same re-ranker on the encoder's fp32 tokens. Agreement = the re-ranked top-1 place equals the fp32
re-ranker's. Timing: the settings run interleaved per query (so background load hits them alike); medians.
Prints a table, writes bench/results/tokens.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))
import token_sets  # noqa: E402

SETTINGS = {   # name -> (kind, TokenOptions kwargs)
    'fp16': ('fp16', {}),
    'int8': ('int8', {}),
    'pq32': ('pq', {'pq_m': 32}),
    'pq32-noopq': ('pq', {'pq_m': 32, 'opq': False}),
    'pq64': ('pq', {'pq_m': 64}),
}


class _Fp32Tokens:
    """The encoder's own fp32 tokens as a `local_tokens` provider (the baseline re-ranker)."""

    def __init__(self, enc: token_sets.Encoded) -> None:
        self.enc = enc

    def local_tokens(self, place_id: int):
        a, b = self.enc.offsets[place_id], self.enc.offsets[place_id + 1]
        return self.enc.local[a:b], self.enc.index[a:b], self.enc.xy[a:b]


def _build(ts: token_sets.TokenSet, name: str, out: pathlib.Path):
    from fol_ros.records import ModelInfo
    from fol_ros.search.place_map import PlaceMap
    from fol_ros.search.tokens import TokenOptions
    kind, kwargs = SETTINGS[name]
    pmap = PlaceMap.create(ModelInfo('bench', (322, 322), '0' * 64), ts.ref.globals.shape[1], ts.ref.local.shape[1])
    for i in range(len(ts.ref)):
        pmap.add(ts.ref.encoding(i), int(ts.ref.stamps[i]))
    t0 = time.perf_counter()
    pmap.save(out / name, tokens=TokenOptions(kind, **kwargs))
    seconds = time.perf_counter() - t0
    loaded = PlaceMap.load(out / name)
    files = {f.name: f.stat().st_size for f in (out / name).iterdir() if f.is_file()}
    return loaded, seconds, files


def _recall(top: list[list[int]], positives: list[set[int]], qs: list[int]) -> list[float]:
    return [float(np.mean([bool(set(top[j][:n]) & positives[q]) for j, q in enumerate(qs)])) for n in (1, 5, 10)]


def run_set(name: str, settings: list[str], k: int, step: int, tmp: pathlib.Path) -> dict:
    from fol_ros.config import RerankConfig
    from fol_ros.records import Candidate, Encoding
    from fol_ros.rerank import rerank_candidates
    ts = token_sets.load(name)
    n = len(ts.ref)
    maps, rows = {'fp32': _Fp32Tokens(ts.ref)}, {}
    for s in settings:
        pmap, seconds, files = _build(ts, s, tmp)
        maps[s] = pmap
        total = sum(files.values())
        tokens = sum(v for f, v in files.items() if f.startswith('local_') and f not in
                     ('local_index.npy', 'local_xy.npy', 'local_offsets.npy')) + files['local.npy']
        rows[s] = {'mb_per_place': total / n / 1e6, 'token_mb_per_place': tokens / n / 1e6,
                   'bytes_per_token': tokens / int(ts.ref.offsets[-1]), 'save_s': round(seconds, 1),
                   'files': files}
        print(f'  {name} {s}: {total / n / 1e6:.3f} MB/place, saved in {seconds:.1f} s', file=sys.stderr, flush=True)
    rows['fp32'] = {'mb_per_place': None, 'token_mb_per_place': ts.ref.local.nbytes / n / 1e6,
                    'bytes_per_token': 4 * ts.ref.local.shape[1], 'save_s': None, 'files': {}}
    sims = ts.query.globals @ ts.ref.globals.T
    top = np.argsort(-sims, 1, kind='stable')[:, :k]
    qs = list(range(0, len(ts.query), step))
    config = RerankConfig(top_k=k)
    ranked = {s: [] for s in maps}
    margins = []   # fp32: best count - second best count (a close call flips on any change of the tokens)
    counts = {s: [] for s in maps}
    times = {s: [] for s in maps}
    decode = {s: [] for s in maps}
    for j, q in enumerate(qs):
        a, b = ts.query.offsets[q], ts.query.offsets[q + 1]
        query = Encoding(ts.query.globals[q], ts.query.local[a:b], ts.query.index[a:b], ts.query.xy[a:b],
                         tuple(ts.query.grids[q]), tuple(ts.query.sizes[q]))
        for s, m in maps.items():
            cands = [Candidate(int(p), float(sims[q, p]), r) for r, p in enumerate(top[q])]
            t0 = time.perf_counter()
            for c in cands:
                m.local_tokens(c.place_id)
            t1 = time.perf_counter()
            out = rerank_candidates(query, cands, m, config)
            t2 = time.perf_counter()
            decode[s].append((t1 - t0) * 1e3)
            times[s].append((t2 - t1) * 1e3)
            ranked[s].append([c.place_id for c in out.candidates])
            counts[s].append({c.place_id: c.local_matches for c in out.candidates[:k]})
            if s == 'fp32':
                margins.append(out.candidates[0].local_matches - out.candidates[1].local_matches)
        if j % 10 == 0:
            print(f'  {name}: query {j + 1}/{len(qs)}', file=sys.stderr, flush=True)
    base = [r[0] for r in ranked['fp32']]
    global_recall = _recall([list(t) for t in top[qs]], ts.positives, qs)
    for s in maps:
        hits = _recall(ranked[s], ts.positives, qs)
        rows[s].update(recall_at_1_5_10=hits, correct_at_1_5_10=[round(h * len(qs)) for h in hits],
                       top1_agreement=float(np.mean([r[0] == b for r, b in zip(ranked[s], base)])),
                       order_agreement=float(np.mean([r == f for r, f in zip(ranked[s], ranked['fp32'])])),
                       max_count_change=int(max(abs(c[p] - f[p]) for c, f in zip(counts[s], counts['fp32'])
                                                for p in f)),
                       rerank_ms=round(statistics.median(times[s]), 1),
                       tokens_read_ms=round(statistics.median(decode[s]), 2))
    return {'set': name, 'places': n, 'queries': len(qs), 'query_step': step, 'k': k,
            'mean_tokens_per_place': float(np.diff(ts.ref.offsets).mean()), 'global_recall_at_1_5_10': global_recall,
            'fp32_top1_margin_le_2': float(np.mean(np.array(margins) <= 2)),
            'fp32_top1_margin_median': float(np.median(margins)),
            'load_average_1m': os.getloadavg()[0], 'settings': rows}


def _print(result: dict) -> None:
    print(f"\n{result['set']}: {result['places']} places (mean {result['mean_tokens_per_place']:.0f} tokens), "
          f"{result['queries']} queries, re-rank top {result['k']}; global R@1/5/10 "
          + '/'.join(f'{v:.3f}' for v in result['global_recall_at_1_5_10'])
          + f"; fp32 best-vs-second count margin: median {result['fp32_top1_margin_median']:.0f}, "
          f"<= 2 for {100 * result['fp32_top1_margin_le_2']:.0f} % of queries")
    print(f"{'tokens':>11} {'MB/place':>9} {'tok MB':>7} {'B/token':>8} {'R@1':>6} {'R@5':>6} {'R@10':>6} "
          f"{'correct@1/5/10':>15} {'top1 = fp32':>11} {'order = fp32':>12} {'max count diff':>14} {'rerank ms':>9} "
          f"{'read ms':>8}")
    for s, r in result['settings'].items():
        mb = '-' if r['mb_per_place'] is None else f"{r['mb_per_place']:.3f}"
        rec = r['recall_at_1_5_10']
        print(f"{s:>11} {mb:>9} {r['token_mb_per_place']:>7.3f} {r['bytes_per_token']:>8.1f} {rec[0]:>6.3f} "
              f"{rec[1]:>6.3f} {rec[2]:>6.3f} {'/'.join(map(str, r['correct_at_1_5_10'])):>15} "
              f"{r['top1_agreement']:>11.3f} {r['order_agreement']:>12.3f} {r['max_count_change']:>14d} "
              f"{r['rerank_ms']:>9.0f} {r['tokens_read_ms']:>8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sets', nargs='+', default=['corridor', 'demo'])
    p.add_argument('--settings', nargs='+', default=['fp16', 'int8', 'pq32'], choices=list(SETTINGS))
    p.add_argument('--k', type=int, default=10, help='candidates re-ranked (the node default rerank.top_k)')
    p.add_argument('--step', type=int, default=1, help='every STEP-th query (1 = all)')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'tokens.json'))
    args = p.parse_args()
    results = []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            results.append(run_set(name, args.settings, args.k, args.step, pathlib.Path(tmp)))
            _print(results[-1])
            out.write_text(json.dumps({'bench': 'tokens', 'utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                                       'cpu_count': os.cpu_count(), 'results': results}, indent=1) + '\n')
            print(f'wrote {out}', flush=True)


if __name__ == '__main__':
    main()

"""Fleet back end candidates on one machine: insert and single-query search latency, recall@10 against exact faiss,
with and without the node's exclusion filter (stamp <= T and not the last 20 places), and whether a second process
can open the same embedded store. Used to choose Milvus over Qdrant for `search.backend` (docs/fleet.md).

    python bench/bench_backend.py milvus-lite            # embedded milvus-lite (MilvusClient('x.db'))
    python bench/bench_backend.py milvus-server          # starts `python -m milvus_lite server`, connects over gRPC
    python bench/bench_backend.py qdrant-local           # qdrant-client local mode (needs qdrant-client installed)

Descriptors: rows of real FoL global descriptors (`--globals a.npy b.npy`, e.g. maps' globals.npy) repeated with
noise (sigma 0.02 per dimension) to N places; without --globals, seeded clustered synthetic ones. Only numpy, faiss
and the database's client are imported, so the Qdrant run works in any environment that has qdrant-client.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

D, K, Q = 8448, 10, 50


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def data(n: int, globals_files: list[str]):
    rng = np.random.default_rng(0)
    if globals_files:
        base = np.concatenate([np.load(f) for f in globals_files]).astype(np.float32)
    else:
        base = unit(rng.normal(size=(max(10, n // 50), D)).astype(np.float32))
    x = unit(base[rng.integers(0, len(base), n)] + 0.02 * rng.normal(size=(n, D)).astype(np.float32))
    q = unit(x[rng.choice(n, Q, replace=False)] + 0.01 * rng.normal(size=(Q, D)).astype(np.float32))
    return x, np.arange(n, dtype=np.int64) * 1_000_000_000, q


def timed(fn, queries):
    t = []
    for q in queries:
        s = time.perf_counter()
        fn(q)
        t.append((time.perf_counter() - s) * 1000)
    return round(float(np.median(t)), 1), round(float(np.percentile(t, 90)), 1)


def recall(got, ref):
    return float(np.mean([len(set(g) & set(r)) / K for g, r in zip(got, ref)]))


def milvus(x, stamps, qs, excl_t, excl_ids, uri, out):
    from pymilvus import DataType, MilvusClient
    c = MilvusClient(uri)
    s = MilvusClient.create_schema(auto_id=False)
    s.add_field('key', DataType.INT64, is_primary=True)
    s.add_field('stamp_ns', DataType.INT64)
    s.add_field('g', DataType.FLOAT_VECTOR, dim=D)
    ip = c.prepare_index_params()
    ip.add_index('g', index_type='FLAT', metric_type='IP')
    c.create_collection('p', schema=s, index_params=ip)
    t0 = time.perf_counter()
    for i in range(0, len(x), 256):
        c.insert('p', [{'key': j, 'stamp_ns': int(stamps[j]), 'g': x[j]} for j in range(i, min(len(x), i + 256))])
    c.flush('p')   # what MilvusIndex does after adding to milvus-lite (unflushed rows are scanned in Python)
    out['insert_s'] = round(time.perf_counter() - t0, 1)
    c.load_collection('p')
    expr = f'stamp_ns <= {excl_t} and key not in {excl_ids}'
    def plain(q):
        return [h['key'] for h in c.search('p', [q], limit=K, anns_field='g')[0]]

    def filt(q):
        return [h['key'] for h in c.search('p', [q], limit=K, anns_field='g', filter=expr)[0]]

    one = x[:1] * 0 + qs[0]
    t0 = time.perf_counter()
    c.insert('p', [{'key': len(x) + 1, 'stamp_ns': 0, 'g': one[0]}])
    c.flush('p')
    out['insert_one_with_flush_ms'] = round((time.perf_counter() - t0) * 1000, 1)
    out['inserted_found_at_once'] = plain(qs[0])[0] == len(x) + 1
    c.delete('p', ids=[len(x) + 1])
    c.flush('p')
    out['count_ms'] = timed(lambda q: c.query('p', filter='', output_fields=['count(*)']), qs[:10])
    return plain, filt


def qdrant(x, stamps, qs, excl_t, excl_ids, path, out):
    from qdrant_client import QdrantClient, models
    c = QdrantClient(path=path)
    c.create_collection('p', vectors_config=models.VectorParams(size=D, distance=models.Distance.DOT))
    t0 = time.perf_counter()
    for i in range(0, len(x), 256):
        rows = range(i, min(len(x), i + 256))
        c.upsert('p', points=models.Batch(ids=list(rows), vectors=x[i:i + 256].tolist(),
                                          payloads=[{'stamp_ns': int(stamps[j])} for j in rows]))
    out['insert_s'] = round(time.perf_counter() - t0, 1)
    flt = models.Filter(must=[models.FieldCondition(key='stamp_ns', range=models.Range(lte=excl_t))],
                        must_not=[models.HasIdCondition(has_id=excl_ids)])
    def plain(q):
        return [p.id for p in c.query_points('p', query=q.tolist(), limit=K).points]

    def filt(q):
        return [p.id for p in c.query_points('p', query=q.tolist(), limit=K, query_filter=flt).points]

    code = f'from qdrant_client import QdrantClient; QdrantClient(path={path!r})'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    out['second_process'] = 'opens' if r.returncode == 0 else (r.stderr.strip().splitlines() or ['?'])[-1][:200]
    return plain, filt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('engine', choices=['milvus-lite', 'milvus-server', 'qdrant-local'])
    ap.add_argument('-n', type=int, default=10_000)
    ap.add_argument('--globals', nargs='*', default=[])
    ap.add_argument('--out', default='')
    args = ap.parse_args()
    x, stamps, qs = data(args.n, args.globals)
    n = len(x)
    excl_t, excl_ids = int(stamps[n // 2]), list(range(n - 20, n))
    flat = faiss.IndexFlatIP(D)
    flat.add(x)
    exact = flat.search(qs, K)[1]
    allowed = stamps <= excl_t
    allowed[excl_ids] = False
    bitmap = np.packbits(allowed, bitorder='little')
    sel = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap)))
    exact_f = flat.search(qs, K, params=sel)[1]
    out = {'engine': args.engine, 'places': n, 'dim': D, 'real_globals': bool(args.globals),
           'faiss_flat_ms_p50_p90': timed(lambda q: flat.search(q[None], K), qs)}
    tmp = Path(tempfile.mkdtemp(prefix='bench_backend-'))
    server = None
    try:
        if args.engine == 'qdrant-local':
            plain, filt = qdrant(x, stamps, qs, excl_t, excl_ids, str(tmp / 'q'), out)
        else:
            uri = str(tmp / 'm.db')
            if args.engine == 'milvus-server':
                with socket.socket() as s:
                    s.bind(('127.0.0.1', 0))
                    port = s.getsockname()[1]
                server = subprocess.Popen([sys.executable, '-m', 'milvus_lite', 'server', '--data-dir', uri,
                                           '--host', '127.0.0.1', '--port', str(port)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
                uri = f'http://127.0.0.1:{port}'
                for _ in range(300):
                    try:
                        socket.create_connection(('127.0.0.1', port), timeout=1).close()
                        break
                    except OSError:
                        time.sleep(0.2)
            plain, filt = milvus(x, stamps, qs, excl_t, excl_ids, uri, out)
            if args.engine == 'milvus-lite':
                code = (f'from pymilvus import MilvusClient\ntry:\n    MilvusClient({uri!r})\n    print("opens")\n'
                        'except Exception as e:\n    print(str(e)[:200])')
                r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
                out['second_process'] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-200:]
        out['search_ms_p50_p90'] = timed(plain, qs)
        out['filtered_ms_p50_p90'] = timed(filt, qs)
        out['recall@10'] = recall([plain(q) for q in qs], exact)
        out['filtered_recall@10'] = recall([filt(q) for q in qs], exact_f)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

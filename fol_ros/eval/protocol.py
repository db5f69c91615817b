"""The paper's benchmark protocol (fol-method §9.1, §11) on a dataset folder.

Database first, then queries, encoded in batches of 16; exact L2 retrieval over the unit-norm global descriptors
(faiss IndexFlatL2, as the official test) with k = max(recall values), capped by the database size; the top-K
re-ranked by FoL's mutual-NN count with a stable sort whose ties keep the global order (§14 quirk 10, fixed).
Local tokens stream to an fp16 file instead of RAM (§14 quirk 22).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fol_ros.errors import BadInputError, ConfigError
from fol_ros.eval.datasets import VprDataset, read_rgb
from fol_ros.eval.metrics import (RECALL_VALUES, latency_summary, peak_rss_mb, precision_recall_curve,
                                  recall_at_k)
from fol_ros.eval.tokens import TokenStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetEvalOptions:
    """Settings of one benchmark run.

    rerank_k: candidates re-ranked per query (the paper: 100); 0 disables re-ranking.
    recall_values: N of Recall@N; retrieval returns max(recall_values) candidates.
    batch_size: images per encoder call (the official infer_batch_size is 16).
    threshold: cosine above which a mutual-NN token pair counts (0.7).
    memory_budget_mb: bound on the re-ranking similarity workspace.
    rerank_device: torch device for re-ranking ('cpu', 'cuda').
    work_dir: folder for the fp16 token files ('' = a temporary folder, deleted afterwards).
    """

    rerank_k: int = 100
    recall_values: tuple[int, ...] = RECALL_VALUES
    batch_size: int = 16
    threshold: float = 0.7
    memory_budget_mb: float = 512.0
    rerank_device: str = 'cpu'
    work_dir: str = ''

    def __post_init__(self) -> None:
        if self.rerank_k < 0:
            raise ConfigError(f'rerank_k={self.rerank_k} must be >= 0 (0 = no re-ranking)')
        if self.batch_size < 1:
            raise ConfigError(f'batch_size={self.batch_size} must be >= 1')
        if not self.recall_values or min(self.recall_values) < 1:
            raise ConfigError(f'recall values must be >= 1, got {self.recall_values}')


def encode_images(paths: Sequence[Path], encoder, store: TokenStore, batch_size: int,
                  timings: list[float], label: str = 'images') -> np.ndarray:
    """Encode images in order; returns float32 global descriptors [N, D], appends local tokens to `store`."""
    globals_: np.ndarray | None = None
    start = time.perf_counter()
    for b in range(0, len(paths), batch_size):
        batch = [read_rgb(p) for p in paths[b:b + batch_size]]
        t0 = time.perf_counter()
        encodings = encoder.encode(batch)
        timings.extend([(time.perf_counter() - t0) * 1e3 / len(batch)] * len(batch))
        if globals_ is None:
            globals_ = np.zeros((len(paths), encodings[0].global_desc.shape[-1]), dtype=np.float32)
        for i, enc in enumerate(encodings):
            globals_[b + i] = enc.global_desc
            store.append(enc.local)
        done = b + len(batch)
        if done % (batch_size * 20) < batch_size or done == len(paths):
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info('encoded %d/%d %s (%.1f img/s, ETA %.0f s)', done, len(paths), label, rate,
                     (len(paths) - done) / rate)
    if globals_ is None:
        raise BadInputError(f'no {label} to encode')
    return globals_


def search_exact(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 search (faiss IndexFlatL2, ties to the lower index as in the official code); returns (ids, dists)."""
    import faiss

    index = faiss.IndexFlatL2(db.shape[1])
    index.add(np.ascontiguousarray(db, dtype=np.float32))
    dists, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids.astype(np.int64), dists


def rerank_query(query_tokens: np.ndarray, candidates: np.ndarray, db_store: TokenStore,
                 opts: DatasetEvalOptions) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank one query's global top-K; returns (new order of the K candidates, their mutual-NN counts)."""
    from fol_ros import rerank as fol_rerank

    # Copies: the store is a read-only memmap, and K x L x 128 fp16 is small (~70 MB for K=100).
    cand_locals = [np.array(db_store.get(int(c))) for c in candidates]
    counts = np.asarray(fol_rerank.mutual_nn_counts(query_tokens, cand_locals, threshold=opts.threshold,
                                                    budget_mb=opts.memory_budget_mb, device=opts.rerank_device))
    # Ties keep the global order: rerank() breaks them by retrieval rank, i.e. position in the global top-K.
    order = np.asarray(fol_rerank.rerank(np.arange(len(candidates)), counts), dtype=np.int64)
    return order, counts


def rerank_all(ids: np.ndarray, q_store: TokenStore, db_store: TokenStore, rerank_k: int, opts: DatasetEvalOptions,
               timings: list[float], on_query: Callable[[int, int], None] | None = None
               ) -> tuple[list[np.ndarray], list[list[int]]]:
    """Re-rank every query's global top-`rerank_k`; returns (full predictions, re-ranked local scores) per query."""
    pred_rerank, top_scores = [], []
    last_log = time.perf_counter()
    for qi, row in enumerate(ids):
        if rerank_k:
            t0 = time.perf_counter()
            order, counts = rerank_query(np.array(q_store.get(qi)), row[:rerank_k], db_store, opts)
            timings.append((time.perf_counter() - t0) * 1e3)
            pred_rerank.append(np.r_[row[:rerank_k][order], row[rerank_k:]])
            top_scores.append(counts[order].tolist())
        else:
            pred_rerank.append(row)
            top_scores.append([])
        if on_query is not None:
            on_query(qi + 1, len(ids))
        if rerank_k and (time.perf_counter() - last_log > 30 or qi + 1 == len(ids)):
            last_log = time.perf_counter()
            per_query = sum(timings) / 1e3 / (qi + 1)
            log.info('re-ranked %d/%d queries (%.2f s per query, ETA %.0f s)', qi + 1, len(ids), per_query,
                     per_query * (len(ids) - qi - 1))
    return pred_rerank, top_scores


def evaluate_dataset(ds: VprDataset, encoder, opts: DatasetEvalOptions = DatasetEvalOptions(),
                     on_query: Callable[[int, int], None] | None = None) -> dict:
    """Run the benchmark protocol and return the result dictionary (see docs/evaluation.md for its keys)."""
    t_start = time.perf_counter()
    k = min(max(opts.recall_values), len(ds.database_paths))
    rerank_k = min(opts.rerank_k, k)
    samples: dict[str, list[float]] = {'encode': [], 'search': [], 'rerank': []}
    with tempfile.TemporaryDirectory(prefix='fol_eval_', dir=opts.work_dir or None) as tmp:
        db_store = TokenStore(Path(tmp) / 'database_tokens.f16')
        q_store = TokenStore(Path(tmp) / 'query_tokens.f16')
        db_g = encode_images(ds.database_paths, encoder, db_store, opts.batch_size, samples['encode'], 'database')
        q_g = encode_images(ds.query_paths, encoder, q_store, opts.batch_size, samples['encode'], 'queries')
        db_store.finish()
        q_store.finish()
        t0 = time.perf_counter()
        ids, dists = search_exact(db_g, q_g, k)
        samples['search'] = [(time.perf_counter() - t0) * 1e3 / len(q_g)] * len(q_g)
        pred_rerank, top_scores = rerank_all(ids, q_store, db_store, rerank_k, opts, samples['rerank'], on_query)
        db_store.close()
        q_store.close()
    return _result(ds, encoder, opts, k, rerank_k, ids, dists, pred_rerank, top_scores, samples, t_start)


def _result(ds: VprDataset, encoder, opts: DatasetEvalOptions, k: int, rerank_k: int, ids: np.ndarray,
            dists: np.ndarray, pred_rerank: list[np.ndarray], top_scores: list[list[int]],
            samples: dict[str, list[float]], t_start: float) -> dict:
    recall_values = sorted(v for v in set(opts.recall_values) if v <= k) or [k]
    positives = ds.positives
    rec_global = recall_at_k(ids.tolist(), positives, recall_values)
    rec_rerank = recall_at_k([p.tolist() for p in pred_rerank], positives, recall_values)
    # Retrieval as a detector: accept the re-ranked top-1 when its match count (else its global similarity)
    # clears a threshold; gives a PR curve comparable with the loop-closure one.
    pos_sets = [set(p.tolist()) for p in positives]
    scores = [(s[0] if s else -float(d[0])) for s, d in zip(top_scores, dists)]
    correct = [int(p[0]) in pos for p, pos in zip(pred_rerank, pos_sets)]
    curve = precision_recall_curve(scores, correct, sum(1 for p in pos_sets if p))
    info = getattr(encoder, 'info', None)
    queries = [{'index': i, 'path': str(ds.query_paths[i]), 'positives': positives[i].tolist(),
                'pred_global': ids[i].tolist(), 'global_distance': [round(float(x), 6) for x in dists[i]],
                'pred_rerank': pred_rerank[i].tolist(), 'rerank_scores': top_scores[i]}
               for i in range(len(ids))]
    return {
        'protocol': 'dataset',
        'dataset': {'name': ds.name, 'layout': ds.layout, 'n_database': len(ds.database_paths),
                    'n_queries': len(ds.query_paths), 'n_queries_with_positives': curve.n_positive_queries,
                    'database_paths': [str(p) for p in ds.database_paths], **ds.extra},
        'model': ({'label': info.label, 'backbone': info.backbone, 'input_size': list(info.input_size),
                   'fingerprint': info.fingerprint} if info is not None else {}),
        'engine': getattr(encoder, 'name', ''),
        'settings': {**asdict(opts), 'k': k, 'rerank_k_used': rerank_k},
        'recall_global': rec_global,
        'recall_rerank': rec_rerank,
        'pr_curve': curve.to_dict(),
        'latency_ms': latency_summary(samples),
        'peak_rss_mb': peak_rss_mb(),
        'wall_s': time.perf_counter() - t_start,
        'queries': queries,
    }


def report_pairs(result: dict, ds: VprDataset, encoder, n: int, threshold: float = 0.7) -> list:
    """Up to n query/top-1 pairs for the report: half correct, half failures, spread over the query list."""
    from fol_ros.eval.report import pair_view

    if n <= 0:
        return []
    rows = result['queries']
    good = [q for q in rows if q['pred_rerank'] and q['pred_rerank'][0] in set(q['positives'])]
    bad = [q for q in rows if q['pred_rerank'] and q['pred_rerank'][0] not in set(q['positives'])]
    n_bad = min(len(bad), n // 2)
    chosen = _spread(good, n - n_bad) + _spread(bad, n_bad)
    views = []
    for q in chosen:
        m = q['pred_rerank'][0]
        ok = m in set(q['positives'])
        title = f'query {q["index"]} -> database {m} ({"correct" if ok else "wrong"})'
        views.append(pair_view(encoder, read_rgb(ds.query_paths[q['index']]), read_rgb(ds.database_paths[m]),
                               title, ok, threshold))
    return views


def _spread(items: list, n: int) -> list:
    if n <= 0 or not items:
        return []
    idx = np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]

"""The paper's benchmark protocol (fol-method §9.1, §11) on a dataset folder.

Database first, then queries, encoded in batches of 16; exact L2 retrieval over the unit-norm global descriptors
(faiss IndexFlatL2, as the official test) with k = max(recall values), capped by the database size; the top-K
re-ranked by FoL's mutual-NN count with a stable sort whose ties keep the global order (§14 quirk 10, fixed).
Local tokens stream to the fp16 on-disk storage of a PlaceMap instead of RAM (§14 quirk 22). Retrieval and
re-ranking are the pipeline's own stages (`fol_ros.pipeline.retrieve` with an `ExactL2Index`, `pipeline.rerank`).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fol_ros.config import RerankConfig
from fol_ros.errors import BadInputError, ConfigError
from fol_ros.eval.datasets import VprDataset, read_rgb
from fol_ros.eval.metrics import (RECALL_VALUES, latency_summary, peak_rss_mb, precision_recall_curve,
                                  recall_at_k)

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
    work_dir: folder for the on-disk token storage ('' = a temporary folder, deleted afterwards).
    tokens: how the database's local tokens are stored: fp16 (the node's maps) or fp32 (what the official test
        holds in RAM: its exact counts).
    """

    rerank_k: int = 100
    recall_values: tuple[int, ...] = RECALL_VALUES
    batch_size: int = 16
    threshold: float = 0.7
    memory_budget_mb: float = 512.0
    rerank_device: str = 'cpu'
    work_dir: str = ''
    tokens: str = 'fp16'

    def __post_init__(self) -> None:
        if self.tokens not in ('fp16', 'fp32'):
            raise ConfigError(f'tokens={self.tokens!r}: the evaluation stores fp16 or fp32 tokens')
        if self.rerank_k < 0:
            raise ConfigError(f'rerank_k={self.rerank_k} must be >= 0 (0 = no re-ranking)')
        if self.batch_size < 1:
            raise ConfigError(f'batch_size={self.batch_size} must be >= 1')
        if not self.recall_values or min(self.recall_values) < 1:
            raise ConfigError(f'recall values must be >= 1, got {self.recall_values}')


def encode_images(paths: Sequence[Path], encoder, folder: Path, batch_size: int, timings: list[float],
                  label: str = 'images', tokens: str = 'fp16'):
    """Encode images in order into a PlaceMap appended to on disk at `folder` (place id = position in `paths`):
    the map's token storage (`tokens`: fp16 or fp32), so tokens never sit in RAM (§14 quirk 22). Returns the map
    (open: close it)."""
    from fol_ros.search.place_map import PlaceMap
    store = None
    start = time.perf_counter()
    try:
        for b in range(0, len(paths), batch_size):
            chunk = paths[b:b + batch_size]
            batch = [read_rgb(p) for p in chunk]
            t0 = time.perf_counter()
            encodings = encoder.encode(batch)
            timings.extend([(time.perf_counter() - t0) * 1e3 / len(batch)] * len(batch))
            if store is None:   # dims from the first encoding (the tiny test model and real ones differ)
                store = PlaceMap.open_append(folder, encoder.info, durable=False,
                                             global_dim=len(encodings[0].global_desc),
                                             local_dim=encodings[0].local.shape[1], tokens=tokens)
            for path, enc in zip(chunk, encodings):
                store.add(enc, 0, None, source=str(path))
            done = b + len(batch)
            if done % (batch_size * 20) < batch_size or done == len(paths):
                rate = done / max(time.perf_counter() - start, 1e-9)
                log.info('encoded %d/%d %s (%.1f img/s, ETA %.0f s)', done, len(paths), label, rate,
                         (len(paths) - done) / rate)
    except BaseException:
        if store is not None:
            store.close()
        raise
    if store is None:
        raise BadInputError(f'no {label} to encode')
    return store


def rerank_all(retrieval, queries, database, rerank_k: int, opts: DatasetEvalOptions, timings: list[float],
               on_query: Callable[[int, int], None] | None = None) -> tuple[list[np.ndarray], list[list[int]]]:
    """Re-rank every query's global top-`rerank_k` with the pipeline's re-ranking stage; returns (full
    predictions, re-ranked local scores) per query."""
    from fol_ros.pipeline import rerank
    from fol_ros.verify.calibration import stored_encoding

    config = RerankConfig(enabled=rerank_k > 0, top_k=max(rerank_k, 1), similarity_threshold=opts.threshold,
                          memory_budget_mb=opts.memory_budget_mb, device=opts.rerank_device)
    pred_rerank, top_scores = [], []
    last_log = time.perf_counter()
    for qi, candidates in enumerate(retrieval.candidates):
        if rerank_k:
            t0 = time.perf_counter()
            ranked = rerank(stored_encoding(queries, qi), candidates, database, config)
            timings.append((time.perf_counter() - t0) * 1e3)
            top_scores.append([c.local_matches for c in ranked.candidates[:rerank_k]])
        else:
            ranked = None
            top_scores.append([])
        order = ranked.candidates if ranked is not None else candidates
        pred_rerank.append(np.array([c.place_id for c in order], np.int64))
        if on_query is not None:
            on_query(qi + 1, len(retrieval.candidates))
        if rerank_k and (time.perf_counter() - last_log > 30 or qi + 1 == len(retrieval.candidates)):
            last_log = time.perf_counter()
            per_query = sum(timings) / 1e3 / (qi + 1)
            log.info('re-ranked %d/%d queries (%.2f s per query, ETA %.0f s)', qi + 1, len(retrieval.candidates),
                     per_query, per_query * (len(retrieval.candidates) - qi - 1))
    return pred_rerank, top_scores


def evaluate_dataset(ds: VprDataset, encoder, opts: DatasetEvalOptions = DatasetEvalOptions(),
                     on_query: Callable[[int, int], None] | None = None) -> dict:
    """Run the benchmark protocol and return the result dictionary (see docs/evaluation.md for its keys).

    The stages are the node's (`fol_ros.pipeline`): encoding, `retrieve` with the exact L2 index and k of the
    paper, `rerank` with re-ranking depth `rerank_k`; descriptors are kept in the map's storage (PlaceMap).
    """
    from fol_ros.pipeline import ExactL2Index, retrieve

    t_start = time.perf_counter()
    k = min(max(opts.recall_values), len(ds.database_paths))
    rerank_k = min(opts.rerank_k, k)
    samples: dict[str, list[float]] = {'encode': [], 'search': [], 'rerank': []}
    with tempfile.TemporaryDirectory(prefix='fol_eval_', dir=opts.work_dir or None) as tmp:
        database = encode_images(ds.database_paths, encoder, Path(tmp) / 'database', opts.batch_size,
                                 samples['encode'], 'database', opts.tokens)
        queries = None
        try:
            queries = encode_images(ds.query_paths, encoder, Path(tmp) / 'queries', opts.batch_size,
                                    samples['encode'], 'queries', opts.tokens)
            t0 = time.perf_counter()
            retrieval = retrieve(ExactL2Index(database.global_matrix(), database.place_ids()), database,
                                 queries.global_matrix(), k)
            samples['search'] = [(time.perf_counter() - t0) * 1e3 / len(queries)] * len(queries)
            pred_rerank, top_scores = rerank_all(retrieval, queries, database, rerank_k, opts, samples['rerank'],
                                                 on_query)
        finally:
            database.close()
            if queries is not None:
                queries.close()
    return _result(ds, encoder, opts, k, rerank_k, retrieval.ids, retrieval.scores, pred_rerank, top_scores,
                   samples, t_start)


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

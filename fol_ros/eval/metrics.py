"""Evaluation metrics: Recall@N (fol-method §11), loop-closure precision-recall, latency percentiles, peak memory.

Everything here is plain numpy on already-computed predictions, so it is exact and cheap to test by hand.
"""
from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fol_ros.errors import BadInputError

# The paper's recall values; k for retrieval is their maximum (fol-method §9.1).
RECALL_VALUES = (1, 5, 10, 25, 100)


def recall_at_k(predictions: Sequence[Sequence[int]], positives: Sequence[Iterable[int]],
                ks: Iterable[int] = RECALL_VALUES) -> dict[str, float]:
    """Share of queries with at least one positive among their first N predictions, for each N in ks.

    Args:
        predictions: per query, database indices best first (may be shorter than max(ks)).
        positives: per query, the database indices that count as correct (may be empty).
        ks: the N values.

    Returns:
        {"N": recall} with values in [0, 1]. The denominator is every query, including those without any
        positive (fol-method §11), so such queries can never be counted as found.
    """
    if len(predictions) != len(positives):
        raise BadInputError(f'recall: {len(predictions)} prediction lists but {len(positives)} positive sets; '
                            'give one of each per query')
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise BadInputError(f'recall values must be >= 1, got {ks}')
    n = len(predictions)
    hits = np.zeros(len(ks), dtype=np.int64)
    for pred, pos in zip(predictions, positives):
        pos_set = {int(p) for p in pos}
        if not pos_set:
            continue
        first = next((i for i, p in enumerate(pred) if int(p) in pos_set), None)
        if first is None:
            continue
        hits += np.array([first < k for k in ks], dtype=np.int64)
    return {str(k): (float(h) / n if n else 0.0) for k, h in zip(ks, hits)}


@dataclass
class PRCurve:
    """Loop-closure precision-recall curve over the decision threshold.

    Attributes:
        thresholds: distinct decision scores, descending; point i accepts every query with score >= thresholds[i].
        precision, recall: at each threshold.
        auc: area under the curve as average precision, sum_i (R_i - R_{i-1}) * P_i with R_{-1} = 0
            (step-wise, no interpolation: the convention of sklearn's average_precision_score).
        max_recall_at_100_precision: the largest recall reached with no false positive (0 if the best-scored
            detection is already wrong).
        n_positive_queries: the recall denominator (queries that have at least one true match).
    """

    thresholds: list[float]
    precision: list[float]
    recall: list[float]
    auc: float
    max_recall_at_100_precision: float
    n_positive_queries: int

    def to_dict(self) -> dict:
        return asdict(self)


def precision_recall_curve(scores: Sequence[float], correct: Sequence[bool],
                           n_positive_queries: int) -> PRCurve:
    """Precision-recall of "accept the query's best match when its score >= t", for every distinct t.

    Args:
        scores: per detected query, the score of its best match (queries with no candidate are left out).
        correct: per detected query, whether that best match is a true positive.
        n_positive_queries: queries that have at least one true match in the map; a query whose best match is
            wrong, or that is never accepted, is a miss.

    Returns:
        The PRCurve. A detection whose match is wrong is a false positive, whatever the query's positives.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    c = np.asarray(correct, dtype=bool).reshape(-1)
    if s.shape != c.shape:
        raise BadInputError(f'PR curve: {s.size} scores but {c.size} correctness flags')
    if not np.all(np.isfinite(s)):
        raise BadInputError('PR curve: scores contain NaN or infinity')
    if n_positive_queries < int(c.sum()):
        raise BadInputError(f'PR curve: {int(c.sum())} correct detections cannot exceed the '
                            f'{n_positive_queries} queries that have a true match')
    order = np.argsort(-s, kind='stable')
    s, c = s[order], c[order]
    tp = np.cumsum(c)
    fp = np.cumsum(~c)
    # One point per distinct score: ties are accepted or rejected together.
    last_of_group = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1] if s.size else np.array([], dtype=int)
    tp, fp, thr = tp[last_of_group], fp[last_of_group], s[last_of_group]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_positive_queries if n_positive_queries else np.zeros_like(precision)
    prev = np.r_[0.0, recall[:-1]]
    auc = float(np.sum((recall - prev) * precision))
    clean = recall[fp == 0]
    return PRCurve(thresholds=thr.tolist(), precision=precision.tolist(), recall=recall.tolist(), auc=auc,
                   max_recall_at_100_precision=float(clean.max()) if clean.size else 0.0,
                   n_positive_queries=int(n_positive_queries))


def operating_point(accepted: Sequence[bool], correct: Sequence[bool], n_positive_queries: int) -> dict:
    """Precision and recall of a fixed decision (e.g. the node's loop-closure gate) over all queries."""
    a = np.asarray(accepted, dtype=bool)
    c = np.asarray(correct, dtype=bool)
    tp = int(np.sum(a & c))
    fp = int(np.sum(a & ~c))
    return {'accepted': int(a.sum()), 'true_positives': tp, 'false_positives': fp,
            'precision': tp / (tp + fp) if tp + fp else 1.0,
            'recall': tp / n_positive_queries if n_positive_queries else 0.0}


def latency_summary(samples_ms: Mapping[str, Sequence[float]],
                    percentiles: Sequence[float] = (50, 90, 99)) -> dict[str, dict[str, float]]:
    """Per stage: count, mean, max and the given percentiles (linear interpolation) of millisecond samples."""
    out: dict[str, dict[str, float]] = {}
    for stage, values in samples_ms.items():
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0:
            continue
        row = {'n': int(v.size), 'mean': float(v.mean()), 'max': float(v.max())}
        row.update({f'p{int(p) if float(p).is_integer() else p}': float(np.percentile(v, p)) for p in percentiles})
        out[stage] = row
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (getrusage; covers torch/faiss, unlike tracemalloc)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == 'darwin' else peak / 1024.0

"""Evaluation metrics against hand-computed cases."""
import numpy as np
import pytest

from fol_ros.errors import BadInputError
from fol_ros.eval.metrics import (latency_summary, operating_point, peak_rss_mb, precision_recall_curve,
                                  recall_at_k)


def test_recall_counts_first_hit_and_all_queries_in_denominator():
    predictions = [[3, 1, 2], [5, 6, 7], [9, 8, 4], [1, 2, 3]]
    positives = [[1], [7, 9], [], [4]]          # q0 hit at 2, q1 hit at 3, q2 has no positives, q3 never hit
    rec = recall_at_k(predictions, positives, ks=(1, 2, 3))
    assert rec == {'1': 0.0, '2': 0.25, '3': 0.5}


def test_recall_top1_and_short_prediction_lists():
    rec = recall_at_k([[0], [4, 2]], [np.array([0]), np.array([2])], ks=(1, 5))
    assert rec == {'1': 0.5, '5': 1.0}


def test_recall_rejects_mismatched_lengths():
    with pytest.raises(BadInputError, match='one of each per query'):
        recall_at_k([[1]], [[1], [2]])


def test_pr_curve_hand_computed():
    # Sorted by score: correct, correct, wrong, correct; 4 queries have a true match (one is never detected).
    curve = precision_recall_curve([0.7, 0.9, 0.6, 0.8], [False, True, True, True], n_positive_queries=4)
    assert curve.thresholds == [0.9, 0.8, 0.7, 0.6]
    assert curve.precision == pytest.approx([1.0, 1.0, 2 / 3, 0.75])
    assert curve.recall == pytest.approx([0.25, 0.5, 0.5, 0.75])
    assert curve.auc == pytest.approx(0.25 + 0.25 + 0.25 * 0.75)
    assert curve.max_recall_at_100_precision == pytest.approx(0.5)


def test_pr_curve_groups_ties_and_handles_wrong_first():
    curve = precision_recall_curve([5, 5, 3], [True, False, True], n_positive_queries=2)
    assert curve.thresholds == [5, 3]
    assert curve.precision == pytest.approx([0.5, 2 / 3])
    assert curve.recall == pytest.approx([0.5, 1.0])
    assert curve.max_recall_at_100_precision == 0.0
    assert curve.auc == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_pr_curve_perfect_detector_has_unit_auc():
    curve = precision_recall_curve([3, 2, 1], [True, True, True], n_positive_queries=3)
    assert curve.auc == pytest.approx(1.0)
    assert curve.max_recall_at_100_precision == pytest.approx(1.0)


def test_pr_curve_rejects_more_hits_than_positive_queries():
    with pytest.raises(BadInputError, match='cannot exceed'):
        precision_recall_curve([1, 2], [True, True], n_positive_queries=1)


def test_operating_point():
    op = operating_point([True, True, False, True], [True, False, True, True], n_positive_queries=4)
    assert op['true_positives'] == 2 and op['false_positives'] == 1
    assert op['precision'] == pytest.approx(2 / 3) and op['recall'] == pytest.approx(0.5)


def test_latency_summary_percentiles():
    out = latency_summary({'encode': [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 'empty': []})
    assert set(out) == {'encode'}
    row = out['encode']
    assert row['n'] == 10 and row['mean'] == pytest.approx(5.5) and row['max'] == 10
    assert row['p50'] == pytest.approx(5.5) and row['p90'] == pytest.approx(9.1)
    assert peak_rss_mb() > 1.0

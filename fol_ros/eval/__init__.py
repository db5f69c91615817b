"""Evaluation: metrics, benchmark dataset layouts, the dataset and rosbag protocols, and the HTML report.

Public API: `recall_at_k`, `precision_recall_curve`, `max_recall_at_100_precision` (via the curve),
`latency_summary`, `load_dataset`, `evaluate_dataset` (eval.protocol), `evaluate_bag` (eval.bag),
`write_report` (eval.report). The heavy modules are imported on use, not here.
"""
from fol_ros.eval.datasets import VprDataset, load_dataset, positives_within
from fol_ros.eval.metrics import (RECALL_VALUES, PRCurve, latency_summary, operating_point, peak_rss_mb,
                                  precision_recall_curve, recall_at_k)

__all__ = ['RECALL_VALUES', 'PRCurve', 'VprDataset', 'latency_summary', 'load_dataset', 'operating_point',
           'peak_rss_mb', 'positives_within', 'precision_recall_curve', 'recall_at_k']

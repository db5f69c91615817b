"""Scoring a stream of frames against places with known positions: shared by `fol-ros eval --bag` (offline replay
of the node's pipeline) and the live recorder node (the node's published outputs).

Ground truth comes from poses: a frame's positives are the places that exist when it is processed, are not
excluded as recent (the same exclusion the node applies: places newer than the query stamp minus T seconds, and
the places added most recently), and lie within D metres (inclusive) of the frame's position.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fol_ros.errors import BadInputError
from fol_ros.eval.metrics import (RECALL_VALUES, latency_summary, operating_point, precision_recall_curve,
                                  recall_at_k)

SCORE_KEYS = ('confidence', 'local_matches', 'global_similarity')


@dataclass
class FrameRecord:
    """One scored frame."""

    stamp_ns: int
    position: list[float]
    positives: list[int]
    pred_global: list[int]
    pred_rerank: list[int]
    scores: dict[str, float]
    accepted: bool
    added_place_id: int = -1
    status: int = 0


class StreamScorer:
    """Accumulates frames and places; `result()` gives recalls, loop-closure PR curves and latencies.

    Args:
        radius_m: D, the distance within which a place is a positive.
        recall_values: N of Recall@N.
    """

    def __init__(self, radius_m: float = 25.0, recall_values: tuple[int, ...] = RECALL_VALUES) -> None:
        self.radius_m = check_radius(radius_m)
        self.recall_values = tuple(recall_values)
        self.place_ids: list[int] = []
        self.place_stamps: list[int] = []
        self.place_xyz: list[list[float]] = []
        self.frames: list[FrameRecord] = []
        self.latencies: dict[str, list[float]] = {}
        self.skipped_no_pose = 0
        self._known: set[int] = set()

    def add_place(self, place_id: int, stamp_ns: int, position: Sequence[float] | None) -> None:
        """A place that queries may match (from a loaded map, or a keyframe the node added)."""
        if position is None or int(place_id) in self._known:
            return
        self._known.add(int(place_id))
        self.place_ids.append(int(place_id))
        self.place_stamps.append(int(stamp_ns))
        self.place_xyz.append([float(v) for v in position[:3]])

    def positives(self, position: Sequence[float], max_stamp_ns: int | None = None,
                  excluded_ids: Iterable[int] = ()) -> list[int]:
        """Ids of the known places within radius_m of `position`, minus the excluded ones."""
        if not self.place_ids:
            return []
        xyz = np.asarray(self.place_xyz, dtype=np.float64)
        near = np.linalg.norm(xyz - np.asarray(position[:3], dtype=np.float64), axis=1) <= self.radius_m
        if max_stamp_ns is not None:
            near &= np.asarray(self.place_stamps, dtype=np.int64) <= max_stamp_ns
        ex = set(int(i) for i in excluded_ids)
        return [pid for pid, ok in zip(self.place_ids, near) if ok and pid not in ex]

    def add_frame(self, stamp_ns: int, position: Sequence[float] | None, positives: list[int],
                  pred_global: Sequence[int], pred_rerank: Sequence[int], scores: dict[str, float],
                  accepted: bool, timings_ms: dict[str, float] | None = None, added_place_id: int = -1,
                  status: int = 0) -> None:
        """Record one processed frame (its positives computed with `positives()` at processing time)."""
        for stage, ms in (timings_ms or {}).items():
            self.latencies.setdefault(stage, []).append(float(ms))
        if position is None:
            self.skipped_no_pose += 1
            return
        self.frames.append(FrameRecord(int(stamp_ns), [float(v) for v in position[:3]], list(positives),
                                       [int(i) for i in pred_global], [int(i) for i in pred_rerank],
                                       dict(scores), bool(accepted), int(added_place_id), int(status)))

    def result(self) -> dict:
        """Recall@N over the frames that have a positive; loop-closure PR curves over every frame with a match."""
        with_pos = [f for f in self.frames if f.positives]
        n_pos = len(with_pos)
        rec_g = recall_at_k([f.pred_global for f in with_pos], [f.positives for f in with_pos],
                            self.recall_values) if with_pos else {str(k): 0.0 for k in self.recall_values}
        rec_r = recall_at_k([f.pred_rerank for f in with_pos], [f.positives for f in with_pos],
                            self.recall_values) if with_pos else {str(k): 0.0 for k in self.recall_values}
        detected = [f for f in self.frames if f.pred_rerank]
        correct = [f.pred_rerank[0] in set(f.positives) for f in detected]
        curves = {}
        for key in SCORE_KEYS:
            if detected and all(key in f.scores for f in detected):
                curves[key] = precision_recall_curve([f.scores[key] for f in detected], correct, n_pos).to_dict()
        if not curves:
            curves['confidence'] = precision_recall_curve([], [], n_pos).to_dict()
        main_key = next(k for k in SCORE_KEYS if k in curves)
        gate = operating_point([f.accepted for f in self.frames],
                               [bool(f.pred_rerank) and f.pred_rerank[0] in set(f.positives) for f in self.frames],
                               n_pos)
        return {
            'n_frames': len(self.frames) + self.skipped_no_pose,
            'n_frames_scored': len(self.frames),
            'n_frames_without_pose': self.skipped_no_pose,
            'n_queries_with_positives': n_pos,
            'n_places': len(self.place_ids),
            'radius_m': self.radius_m,
            'recall_denominator': 'frames with at least one positive place',
            'recall_global': rec_g,
            'recall_rerank': rec_r,
            'loop_closure': {'score': main_key, 'curve': curves[main_key], 'curves': curves, 'gate': gate},
            'latency_ms': latency_summary(self.latencies),
            'queries': [f.__dict__ for f in self.frames],
        }


def check_radius(radius_m: float) -> float:
    """Validate D."""
    if not radius_m > 0:
        raise BadInputError(f'positive radius {radius_m} m must be > 0')
    return float(radius_m)

"""The one pose lookup by time: which pose goes with a camera frame.

Used by the node's frame worker (the odometry pose of each frame), `fol-ros eval --bag` (the same pose for the
replayed frames, and interpolated ground truth for scoring), the live recorder, and bag sources for map building.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import numpy as np

from fol_ros.records import Pose


def nearest_index(stamps: Sequence[int], stamp_ns: int, tolerance_ns: int | None = None) -> int | None:
    """Index of the stamp nearest to `stamp_ns` in a sorted sequence (the earlier one on a tie), or None when the
    sequence is empty or the nearest is farther than `tolerance_ns` (None = any distance). The one rule for "the
    sample that goes with this frame", also used by the pose graph to attach a loop closure to its odometry."""
    t = int(stamp_ns)
    i = bisect.bisect_left(stamps, t)
    j = min((k for k in (i - 1, i) if 0 <= k < len(stamps)), key=lambda k: abs(stamps[k] - t), default=None)
    if j is None or (tolerance_ns is not None and abs(stamps[j] - t) > tolerance_ns):
        return None
    return j


class PoseTrack:
    """Stamped poses kept in stamp order (out-of-order samples are placed by stamp).

    Args:
        samples: initial (stamp ns, Pose) pairs.
        max_gap_s: `position_at` interpolates only between samples at most this far apart, and otherwise answers
            with a sample within this distance in time.
        maxlen: keep at most this many samples, dropping the oldest stamp (a live odometry buffer); None = all.
    """

    def __init__(self, samples: Iterable[tuple[int, Pose]] = (), max_gap_s: float = 1.0,
                 maxlen: int | None = None) -> None:
        self.max_gap_ns = int(max_gap_s * 1e9)
        self.maxlen = maxlen
        self._stamps: list[int] = []
        self._poses: list[Pose] = []
        for stamp_ns, pose in samples:
            self.add(stamp_ns, pose)

    def __len__(self) -> int:
        return len(self._stamps)

    @property
    def stamps(self) -> list[int]:
        return list(self._stamps)

    def add(self, stamp_ns: int, pose: Pose | Sequence[float]) -> None:
        """Insert a sample: a Pose, or a bare position (x, y, z) taken as a Pose with identity orientation."""
        if not isinstance(pose, Pose):
            pose = Pose(tuple(float(v) for v in pose[:3]))
        i = bisect.bisect_right(self._stamps, int(stamp_ns))
        self._stamps.insert(i, int(stamp_ns))
        self._poses.insert(i, pose)
        if self.maxlen is not None and len(self._stamps) > self.maxlen:
            del self._stamps[0], self._poses[0]

    def nearest(self, stamp_ns: int, tolerance_ns: int | None = None) -> Pose | None:
        """The sample nearest in time (the earlier one on a tie), or None when there is none within
        `tolerance_ns` (None = any distance in time: what the node gives its pipeline)."""
        j = nearest_index(self._stamps, stamp_ns, tolerance_ns)
        return None if j is None else self._poses[j]

    def position_at(self, stamp_ns: int) -> np.ndarray | None:
        """Position at `stamp_ns`, linearly interpolated between the samples around it when they are at most
        max_gap_s apart, else the nearest sample within max_gap_s; None when no sample is that close."""
        if not self._stamps:
            return None
        t = int(stamp_ns)
        i = bisect.bisect_left(self._stamps, t)
        if i < len(self._stamps) and self._stamps[i] == t:
            return np.asarray(self._poses[i].position)
        if 0 < i < len(self._stamps):
            t0, t1 = self._stamps[i - 1], self._stamps[i]
            if t1 - t0 <= self.max_gap_ns:
                a = (t - t0) / (t1 - t0)
                return (1 - a) * np.asarray(self._poses[i - 1].position) + a * np.asarray(self._poses[i].position)
        near = self.nearest(t, self.max_gap_ns)
        return None if near is None else np.asarray(near.position)

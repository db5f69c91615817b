"""Stage 6b: decide whether the best place hypothesis of a frame becomes a published loop closure.

A hypothesis is accepted only when, in this order:
1. it is not a recent place: its stamp is older than (query stamp - exclude_recent_s) and it is not among the
   exclude_recent_places places added most recently in this session (LIO-SAM's 30 s, Swarm-SLAM's 20 keyframes);
2. its global cosine similarity is >= min_global_similarity;
3. it has >= min_local_matches FoL mutual-NN matches and >= min_inliers RANSAC inliers (a 0 disables that check);
4. the last temporal_consistency processed frames (this one included) each had a hypothesis passing 1-3, each
   within neighbourhood_places place ids of the previous one (ORB-SLAM3-style consistency, allowing the robot to
   move along a previously seen stretch).
The same exclusion is applied before retrieval (`exclusion()`), so excluded places never appear as candidates.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

from fol_ros.config import GateConfig
from fol_ros.records import Candidate
from fol_ros.search.index import ExclusionFilter

_NS = 1_000_000_000


def exclusion_reason(exclusion: ExclusionFilter, place_id: int, stamp_ns: int) -> str:
    """Why the gate's exclusion (`LoopClosureGate.exclusion`) rules a place out, or '' if it does not.

    The gate states its exclusion as the retrieval index's own filter type, so that what retrieval hides and what
    the gate rejects are one value; the gate sets only `ids` (places added most recently) and `newer_than_ns`.
    """
    if int(place_id) in exclusion.ids:
        return f'place {place_id} is among the {len(exclusion.ids)} places added most recently'
    if exclusion.newer_than_ns is not None and stamp_ns > exclusion.newer_than_ns:
        return f'place {place_id} is newer than the recent-time window'
    return ''


@dataclass(frozen=True)
class Decision:
    """Outcome of the gate for one frame.

    Attributes:
        accepted: every gate passed; publish a loop closure for `candidate`.
        candidate: the hypothesis examined (the best candidate), or None when there was none.
        temporal_support: consecutive frames, this one included, that agree on this neighbourhood of places.
        reason: 'accepted' or the first gate that failed, with the numbers.
    """

    accepted: bool
    candidate: Candidate | None
    temporal_support: int
    reason: str


class LoopClosureGate:
    """Stateful loop-closure decision over a stream of frames (one instance per session)."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self._recent: deque[int] = deque(maxlen=max(int(config.exclude_recent_places), 0) or None)
        self._last_place: int | None = None
        self._support = 0

    def reset(self) -> None:
        """Forget the temporal chain and the recently added places."""
        self._recent.clear()
        self._last_place = None
        self._support = 0

    def note_added(self, place_id: int) -> None:
        """Record that a place joined the map in this session (it is then excluded for a while)."""
        if self.config.exclude_recent_places > 0:
            self._recent.append(int(place_id))

    def exclusion(self, query_stamp_ns: int) -> ExclusionFilter:
        """The places a query taken at `query_stamp_ns` must not match: those stamped later than
        `newer_than_ns` (None: no time window) and the ids in `ids` (added most recently, sorted)."""
        window_ns = int(round(self.config.exclude_recent_s * _NS))
        max_stamp = int(query_stamp_ns) - window_ns if window_ns > 0 else None
        return ExclusionFilter(newer_than_ns=max_stamp, ids=tuple(sorted(self._recent)))

    def check(self, query_stamp_ns: int, candidate: Candidate | None) -> str:
        """Gates 1-3 for one candidate, without touching the temporal state: '' if it passes, else the reason."""
        cfg = self.config
        if candidate is None:
            return 'no candidate'
        excluded = exclusion_reason(self.exclusion(query_stamp_ns), candidate.place_id, candidate.stamp_ns)
        if excluded:
            return f'excluded: {excluded}'
        if candidate.global_similarity < cfg.min_global_similarity:
            return f'global similarity {candidate.global_similarity:.3f} < {cfg.min_global_similarity}'
        if cfg.min_local_matches > 0 and candidate.local_matches < cfg.min_local_matches:
            return f'local matches {candidate.local_matches} < {cfg.min_local_matches}'
        if cfg.min_inliers > 0 and candidate.geometric_inliers < cfg.min_inliers:
            return f'geometric inliers {candidate.geometric_inliers} < {cfg.min_inliers}'
        return ''

    def update(self, query_stamp_ns: int, candidates: Sequence[Candidate]) -> Decision:
        """Examine the best candidate of one processed frame and advance the temporal chain.

        Args:
            query_stamp_ns: camera time of the query frame.
            candidates: the frame's candidates, best first (may be empty).
        """
        best = candidates[0] if candidates else None
        failed = self.check(query_stamp_ns, best)
        if failed:
            self._last_place, self._support = None, 0
            return Decision(False, best, 0, failed)
        near = (self._last_place is not None
                and abs(best.place_id - self._last_place) <= self.config.neighbourhood_places)
        self._support = self._support + 1 if near else 1
        self._last_place = best.place_id
        need = self.config.temporal_consistency
        if self._support < need:
            return Decision(False, best, self._support, f'temporal support {self._support} < {need}')
        return Decision(True, best, self._support, 'accepted')

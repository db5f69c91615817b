"""fol_ros.verify.gate: each gate rejects on its own, temporal consistency and the exclusion windows."""
import pytest

from fol_ros.config import GateConfig
from fol_ros.records import Candidate
from fol_ros.search.index import ExclusionFilter
from fol_ros.verify.gate import LoopClosureGate, exclusion_reason

S = 1_000_000_000


def cand(place_id: int, sim: float = 0.8, matches: int = 50, inliers: int = 20, stamp_s: float = 0.0) -> Candidate:
    return Candidate(place_id=place_id, retrieval_rank=0, global_similarity=sim, local_matches=matches,
                     geometric_inliers=inliers, stamp_ns=int(stamp_s * S))


def gate(**kw) -> LoopClosureGate:
    base = dict(min_global_similarity=0.5, min_local_matches=30, min_inliers=10, temporal_consistency=3,
                neighbourhood_places=2, exclude_recent_s=30.0, exclude_recent_places=5)
    base.update(kw)
    return LoopClosureGate(GateConfig(**base))


def test_accepts_after_n_consistent_frames():
    g = gate()
    decisions = [g.update(100 * S + i, [cand(10 + i)]) for i in range(4)]
    assert [d.accepted for d in decisions] == [False, False, True, True]
    assert [d.temporal_support for d in decisions] == [1, 2, 3, 4]
    assert decisions[0].reason == 'temporal support 1 < 3'
    assert decisions[2].reason == 'accepted' and decisions[2].candidate.place_id == 12


@pytest.mark.parametrize('bad, reason', [
    (dict(sim=0.49), 'global similarity'),
    (dict(matches=29), 'local matches 29 < 30'),
    (dict(inliers=9), 'geometric inliers 9 < 10'),
])
def test_each_threshold_rejects_and_breaks_the_chain(bad, reason):
    g = gate(temporal_consistency=2)
    assert g.update(100 * S, [cand(10)]).temporal_support == 1
    d = g.update(101 * S, [cand(11, **bad)])
    assert not d.accepted and reason in d.reason and d.temporal_support == 0
    # the chain restarts: one good frame is not enough again
    assert not g.update(102 * S, [cand(12)]).accepted
    assert g.update(103 * S, [cand(13)]).accepted


def test_zero_thresholds_disable_local_and_geometric_checks():
    g = gate(min_local_matches=0, min_inliers=0, temporal_consistency=1)
    assert g.update(100 * S, [cand(3, matches=0, inliers=0)]).accepted


def test_neighbourhood_jump_restarts_support():
    g = gate(temporal_consistency=2)
    g.update(100 * S, [cand(10)])
    d = g.update(101 * S, [cand(13)])  # |13 - 10| > 2
    assert not d.accepted and d.temporal_support == 1
    assert g.update(102 * S, [cand(15)]).accepted  # |15 - 13| <= 2


def test_no_candidate_breaks_the_chain():
    g = gate(temporal_consistency=2)
    g.update(100 * S, [cand(10)])
    d = g.update(101 * S, [])
    assert not d.accepted and d.reason == 'no candidate' and d.candidate is None
    assert not g.update(102 * S, [cand(10)]).accepted


def test_time_exclusion():
    g = gate(temporal_consistency=1)
    # a place seen 29 s before the query is inside the 30 s window, one 31 s before is not
    d = g.update(100 * S, [cand(1, stamp_s=71.0)])
    assert not d.accepted and d.reason.startswith('excluded')
    assert g.update(100 * S, [cand(1, stamp_s=69.0)]).accepted
    ex = g.exclusion(100 * S)
    assert ex.newer_than_ns == 70 * S
    assert exclusion_reason(ex, 1, 71 * S) and not exclusion_reason(ex, 1, 69 * S)


def test_count_exclusion_only_covers_the_last_n_added():
    g = gate(temporal_consistency=1, exclude_recent_places=3, exclude_recent_s=0.0)
    for pid in range(10):
        g.note_added(pid)
    assert g.exclusion(0).ids == (7, 8, 9)
    assert g.exclusion(0).newer_than_ns is None
    assert 'added most recently' in exclusion_reason(g.exclusion(0), 8, 0)
    assert not g.update(5 * S, [cand(8)]).accepted
    assert g.update(5 * S, [cand(6)]).accepted
    g.reset()
    assert g.exclusion(0).ids == ()


def test_exclusion_disabled():
    g = gate(exclude_recent_places=0, exclude_recent_s=0.0)
    g.note_added(1)
    assert g.exclusion(10 * S) == ExclusionFilter()


def test_check_does_not_change_state():
    g = gate(temporal_consistency=2)
    g.update(100 * S, [cand(10)])
    assert g.check(101 * S, cand(11)) == ''
    assert g.check(101 * S, cand(11, sim=0.1)).startswith('global similarity')
    assert g.update(101 * S, [cand(11)]).accepted

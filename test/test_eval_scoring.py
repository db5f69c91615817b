"""Pose-based ground truth for streams: interpolation, radius, recent-place exclusion, and the result layout."""
import numpy as np
import pytest

from fol_ros.errors import BadInputError
from fol_ros.eval.scoring import StreamScorer
from fol_ros.pose_track import PoseTrack
from fol_ros.records import Pose

S = 1_000_000_000


def test_pose_track_interpolates_and_refuses_gaps():
    track = PoseTrack(max_gap_s=1.0)
    track.add(2 * S, (2.0, 0.0, 0.0))
    track.add(1 * S, (0.0, 0.0, 0.0))          # out of order on purpose
    track.add(10 * S, (9.0, 0.0, 0.0))
    np.testing.assert_allclose(track.position_at(1.5 * S), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(track.position_at(2 * S), [2.0, 0.0, 0.0])
    np.testing.assert_allclose(track.position_at(int(2.4 * S)), [2.0, 0.0, 0.0])   # nearest sample within the gap
    assert track.position_at(6 * S) is None                                        # 4 s from any sample
    assert track.nearest(6 * S).position == (2.0, 0.0, 0.0)   # the node's rule: nearest, any gap
    assert track.nearest(6 * S, tolerance_ns=S) is None         # map build's rule: within a tolerance
    assert PoseTrack().position_at(0) is None and PoseTrack().nearest(0) is None


def test_pose_track_keeps_whole_poses_ties_to_the_earlier_and_bounds_its_length():
    turned = Pose((1.0, 2.0, 3.0), (0.0, 0.0, 0.7071, 0.7071), 'odom')
    track = PoseTrack([(4 * S, Pose((4.0, 0.0, 0.0))), (2 * S, turned)], maxlen=2)
    assert track.nearest(2 * S) is turned                       # orientation and frame kept, not just x, y, z
    assert track.nearest(3 * S) is turned                       # equally far from 2 s and 4 s: the earlier
    track.add(6 * S, (6.0, 0.0, 0.0))                            # a third sample drops the oldest stamp
    assert track.stamps == [4 * S, 6 * S] and track.nearest(0).position == (4.0, 0.0, 0.0)


def test_positives_radius_inclusive_and_exclusions():
    sc = StreamScorer(radius_m=25.0)
    for pid, (stamp, x) in enumerate([(0, 0.0), (1, 25.0), (2, 25.1), (50, 3.0)]):
        sc.add_place(pid, stamp * S, (x, 0.0, 0.0))
    sc.add_place(9, 0, None)                   # no pose: never a positive
    assert sc.positives((0.0, 0.0, 0.0)) == [0, 1, 3]
    assert sc.positives((0.0, 0.0, 0.0), max_stamp_ns=40 * S) == [0, 1]
    assert sc.positives((0.0, 0.0, 0.0), excluded_ids=[0]) == [1, 3]
    with pytest.raises(BadInputError):
        StreamScorer(radius_m=0.0)


def test_result_counts_only_frames_with_positives_in_recall():
    sc = StreamScorer(radius_m=5.0, recall_values=(1, 2))
    sc.add_place(0, 0, (0.0, 0.0, 0.0))
    sc.add_frame(S, (1.0, 0, 0), sc.positives((1.0, 0, 0)), [0], [0], {'confidence': 0.9}, True,
                 {'encode': 10.0})
    sc.add_frame(2 * S, (40.0, 0, 0), sc.positives((40.0, 0, 0)), [0], [0], {'confidence': 0.2}, False,
                 {'encode': 30.0})
    sc.add_frame(3 * S, None, [], [], [], {}, False, {'encode': 20.0})
    r = sc.result()
    assert r['n_frames'] == 3 and r['n_frames_scored'] == 2 and r['n_frames_without_pose'] == 1
    assert r['n_queries_with_positives'] == 1
    assert r['recall_global'] == {'1': 1.0, '2': 1.0}
    lc = r['loop_closure']
    assert lc['curve']['precision'] == pytest.approx([1.0, 0.5])
    assert lc['curve']['max_recall_at_100_precision'] == 1.0
    assert lc['gate']['precision'] == 1.0 and lc['gate']['recall'] == 1.0
    assert r['latency_ms']['encode']['n'] == 3

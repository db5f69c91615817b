"""The live recorder node over loopback DDS: the node's outputs and poses in, the JSON metrics out at shutdown."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ros_env

pytestmark = pytest.mark.ros


def _candidate(msg_cls, place_id, rank, x, conf, matches, sim):
    c = msg_cls()
    c.place_id, c.retrieval_rank, c.confidence = place_id, rank, conf
    c.local_matches, c.global_similarity, c.pose_known = matches, sim, True
    c.pose.position.x = float(x)
    c.place_stamp.sec = 10 + place_id
    return c


def _frame(sec, cands):
    from fol_ros.msg import PlaceRecognition
    m = PlaceRecognition()
    m.header.stamp.sec = sec
    m.candidates = cands
    m.added_place_id = -1
    m.latency.encode_ms, m.latency.total_ms = 100.0 + sec, 150.0 + sec
    return m


def test_recorder_scores_node_outputs_over_dds(tmp_path):
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from fol_ros.msg import LoopClosure, PlaceCandidate
    out = tmp_path / 'live.json'
    rec = subprocess.Popen(
        [sys.executable, '-m', 'fol_ros.tools.recorder', '--ros-args', '-p', 'pose_topic:=/test_pose',
         '-p', 'pose_type:=geometry_msgs/msg/PoseStamped',
         '-p', 'place_recognition_topic:=/test_pr', '-p', 'loop_closure_topic:=/test_lc', '-p', f'out:={out}',
         '-p', 'radius_m:=5.0', '-p', 'exclude_recent_s:=0.0', '-p', 'exclude_recent_places:=0',
         '-p', 'log_every:=1', '-p', 'report:=true'],
        env=ros_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(rec.stdout.readline, '')), daemon=True)
    reader.start()
    rclpy.init()
    node = rclpy.create_node('recorder_test_source')
    try:
        pose_pub = node.create_publisher(PoseStamped, '/test_pose', 100)
        pr_pub = node.create_publisher(type(_frame(0, [])), '/test_pr', 100)
        lc_pub = node.create_publisher(LoopClosure, '/test_lc', 100)
        deadline = time.monotonic() + 60
        while any(p.get_subscription_count() == 0 for p in (pose_pub, pr_pub, lc_pub)):
            assert time.monotonic() < deadline and rec.poll() is None, ''.join(lines)
            rclpy.spin_once(node, timeout_sec=0.05)
        for sec, x in ((100, 0.0), (102, 2.0), (103, 99.0), (104, 50.0)):
            p = PoseStamped()
            p.header.stamp.sec, p.pose.position.x = sec, x
            pose_pub.publish(p)
        # A at x=1 (interpolated): place 0 (x=0) is its positive; re-ranking puts place 1 (x=10) first.
        pr_pub.publish(_frame(101, [_candidate(PlaceCandidate, 1, 1, 10, 0.6, 40, 0.7),
                                    _candidate(PlaceCandidate, 0, 0, 0, 0.5, 30, 0.8)]))
        # B at x=99: place 2 (x=100) is correct and accepted as a loop closure.
        pr_pub.publish(_frame(103, [_candidate(PlaceCandidate, 2, 0, 100, 0.9, 90, 0.9)]))
        # C at x=50: nothing within 5 m, yet a confident wrong match (a false positive).
        pr_pub.publish(_frame(104, [_candidate(PlaceCandidate, 0, 0, 0, 0.7, 50, 0.6)]))
        lc = LoopClosure()
        lc.query_stamp.sec = 103
        lc_pub.publish(lc)
        while not any('frames received: 3' in ln for ln in lines):
            assert time.monotonic() < deadline and rec.poll() is None, ''.join(lines)
            time.sleep(0.05)
    finally:
        node.destroy_node()
        rclpy.shutdown()
    rec.send_signal(signal.SIGINT)
    assert rec.wait(timeout=60) == 0, ''.join(lines)
    result = json.loads(out.read_text())
    assert result['n_frames_scored'] == 3 and result['n_queries_with_positives'] == 2
    assert result['recall_global']['1'] == 1.0
    assert result['recall_rerank']['1'] == 0.5 and result['recall_rerank']['5'] == 1.0
    curve = result['loop_closure']['curve']
    assert result['loop_closure']['score'] == 'confidence'
    assert curve['precision'] == pytest.approx([1.0, 0.5, 1 / 3])
    assert curve['auc'] == pytest.approx(0.5) and curve['max_recall_at_100_precision'] == pytest.approx(0.5)
    gate = result['loop_closure']['gate']
    assert gate['true_positives'] == 1 and gate['false_positives'] == 0
    assert result['latency_ms']['encode']['max'] == pytest.approx(204.0)
    assert out.with_suffix('.html').read_text().startswith('<!DOCTYPE html>')

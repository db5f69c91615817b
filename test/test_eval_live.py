"""Live mode end to end: a rosbag played over DDS into the real node (mapping mode, tiny model) while the
recorder scores the node's outputs against the bag's odometry."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ros_env
from fixtures.node_harness import NodeProcess
from fol_ros.eval.datasets import read_rgb
from fol_ros.records import Pose

pytestmark = [pytest.mark.ros, pytest.mark.slow]
S = 1_000_000_000
N = 8


def _wait(cond, timeout, what, logs=''):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f'timed out waiting for {what}\n{logs() if callable(logs) else logs}'
        time.sleep(0.05)


def test_recorder_scores_the_running_node(tmp_path, corridor_dir):
    import rclpy
    from fixtures.tiny_encoder import tiny_test_encoder
    from fol_ros.model.checkpoint import save_checkpoint
    from fol_ros.sources import write_bag
    ckpt = save_checkpoint(tiny_test_encoder().net, tmp_path / 'tiny.pth')
    frames = sorted((corridor_dir / 'ref').glob('*.jpg'))[:N] + sorted((corridor_dir / 'query').glob('*.jpg'))[:N]
    stamps = [i * S for i in range(N)] + [(N + 12 + i) * S for i in range(N)]
    xs = list(range(N)) * 2
    bag = write_bag(tmp_path / 'bag', [(t, read_rgb(p)) for t, p in zip(stamps, frames)],
                    [(t, Pose((float(x), 0.0, 0.0))) for t, x in zip(stamps, xs)], image_topic='/cam',
                    pose_topic='/odom')
    out = tmp_path / 'live.json'
    rec = subprocess.Popen([sys.executable, '-m', 'fol_ros.tools.recorder', '--ros-args', '-p', f'out:={out}',
                            '-p', 'pose_topic:=/odom', '-p', 'radius_m:=2.0', '-p', 'exclude_recent_s:=10.0',
                            '-p', 'exclude_recent_places:=3', '-p', 'log_every:=1'],
                           env=ros_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(rec.stdout.readline, '')), daemon=True).start()
    node = NodeProcess(ros_env(), tmp_path / 'node.log', autostart=True, mode='mapping', image_topic='/cam',
                       odom_topic='/odom', qos_reliability='reliable', qos_depth=10, max_rate_hz=0.0,
                       **{'model.checkpoint': str(ckpt), 'model.input_size': [294, 294], 'engine.engine': 'torch',
                          'engine.device': 'cpu', 'rerank.top_k': 2, 'verify.method': 'none',
                          'gate.exclude_recent_s': 10.0, 'gate.exclude_recent_places': 3})
    rclpy.init()
    probe = rclpy.create_node('live_eval_probe')
    try:
        # Discovery, not sleeps: the node and the recorder both listen to /odom, the recorder to the node's output.
        _wait(lambda: probe.count_subscribers('/odom') >= 2 and probe.count_subscribers('/cam') >= 1
              and probe.count_subscribers('/place_recognition') >= 1, 120, 'node and recorder',
              lambda: node.log() + ''.join(lines))
        player = subprocess.run([sys.executable, '-m', 'fol_ros.tools.player', str(bag), '--rate', '2',
                                 '--wait-for-subscribers', '/cam', '/odom'], env=ros_env(), timeout=120)
        assert player.returncode == 0
        # The node's newest-frame slot always processes the last frame: wait for its result at the recorder.
        _wait(lambda: any(f'last stamp {stamps[-1]} ns' in ln for ln in lines), 120, 'the last frame',
              lambda: node.log() + ''.join(lines))
    finally:
        probe.destroy_node()
        rclpy.shutdown()
        node.stop()
    rec.send_signal(signal.SIGINT)
    assert rec.wait(timeout=60) == 0, ''.join(lines)
    r = json.loads(out.read_text())
    assert r['protocol'] == 'live' and 2 <= r['n_frames_scored'] <= 2 * N
    assert r['n_places'] >= 2 and r['latency_ms']['encode']['n'] == r['n_frames']
    for q in r['queries']:
        # Ground truth never names a place from the last 10 s, and first-traversal frames have no positive.
        if q['stamp_ns'] < N * S:
            assert q['positives'] == []
        assert all(0 <= p < r['n_places'] for p in q['positives'])
    assert all(0.0 <= v <= 1.0 for v in r['recall_rerank'].values())
    assert out.with_suffix('.html').exists()

"""Soak (slow): 2,000+ frames streamed into the node (tiny model, localisation). Its resident memory after the
warm-up must stay flat: nothing grows per frame (slot, statistics windows, odometry buffer, messages)."""
import pathlib
import time

import pytest

from conftest import ros_env
from fixtures.node_harness import Client, NodeProcess, rclpy_context
from fol_ros.msg import PlaceRecognition
from test_node_dds import S, assets, tiny_overrides  # noqa: F401  (module fixture reused)

pytestmark = [pytest.mark.ros, pytest.mark.slow]
FRAMES = 2100
ALLOWED_GROWTH_MB = 25.0


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError('no VmRSS')


def test_soak_no_memory_growth(assets):  # noqa: F811
    rclpy_context()
    node = NodeProcess(ros_env(), assets['root'] / 'soak.log', namespace='soak', **tiny_overrides(
        assets, map_path=assets['map'], odom_topic='odom', **{'rerank.top_k': 1}))
    client = Client('soak_client', namespace='soak')
    samples = []
    try:
        client.wait_subscribed(client.image_pub, timeout=120)
        images = assets['images']
        for i in range(FRAMES):
            stamp = (1000 + i) * S
            client.send_odometry(float(i), stamp)
            client.send_image(images[i % len(images)], stamp)
            time.sleep(0.01)   # a 100 Hz camera: most frames are replaced in the slot, as designed
            if i % 100 == 0:
                with client.lock:
                    client.results.clear()   # the client keeps nothing either
                if i >= 300:
                    samples.append(rss_mb(node.proc.pid))
        last = client.wait_result((1000 + FRAMES - 1) * S, timeout=60)
        assert last.status == PlaceRecognition.STATUS_OK
        values = client.wait_until(lambda: client.diagnostic_values() if int(
            client.diagnostic_values().get('received', 0)) >= FRAMES * 0.95 else None, 30, 'diagnostics')
    finally:
        client.close()
        assert node.stop() == 0
    growth = max(samples) - samples[0]
    print(f'RSS {samples[0]:.1f} -> {samples[-1]:.1f} MB (max growth {growth:.1f} MB), '
          f'received {values["received"]}, processed {values["processed"]}, dropped {values["dropped_frames"]}')
    assert int(values['processed']) >= 100
    assert growth < ALLOWED_GROWTH_MB


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
FRAMES = 2100   # streamed in three bursts of 700
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
    images = assets['images']
    idle_rss = []   # measured right after a frame's result, when the node is idle (no transient workspace)
    sent = 0

    def lockstep(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            stamp = (1000 + sent) * S
            client.send_odometry(float(sent), stamp)
            client.send_image(images[sent % len(images)], stamp)
            sent += 1
            assert client.wait_result(stamp, timeout=60).status == PlaceRecognition.STATUS_OK
        with client.lock:
            client.results.clear()   # the client keeps nothing either
        idle_rss.append(rss_mb(node.proc.pid))

    try:
        client.wait_subscribed(client.image_pub, timeout=120)
        lockstep(30)                              # warm-up: allocator pools and torch workspaces reach size
        for _ in range(3):
            for _ in range(FRAMES // 3):          # a 100 Hz camera: most frames are replaced in the slot
                stamp = (1000 + sent) * S
                client.send_odometry(float(sent), stamp)
                client.send_image(images[sent % len(images)], stamp)
                sent += 1
                time.sleep(0.01)
            lockstep(1)
        processed = lambda: int(client.diagnostic_values().get('processed', 0))  # noqa: E731
        values = client.wait_until(lambda: client.diagnostic_values() if processed() >= 60 else None, 60,
                                   'diagnostics')
    finally:
        client.close()
        assert node.stop() == 0
    growth = max(idle_rss[1:]) - idle_rss[0]
    print(f'sent {sent} frames; idle RSS after warm-up and after each 700-frame burst: '
          f'{", ".join(f"{v:.1f}" for v in idle_rss)} MB; received {values["received"]}, '
          f'processed {values["processed"]}, dropped {values["dropped_frames"]}')
    assert sent >= 2000 and int(values['dropped_frames']) > 0
    assert growth < ALLOWED_GROWTH_MB

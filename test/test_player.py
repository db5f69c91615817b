"""fol-ros-play replays a rosbag2 over loopback DDS, in order, at the bag's pace, with /clock."""
import subprocess
import sys
import time

import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from conftest import ros_env

pytestmark = pytest.mark.ros


def _write_bag(path, count, period_ns, start_ns=1_700_000_000 * 10**9):
    store = get_typestore(Stores.ROS2_KILTED)
    string = store.types['std_msgs/msg/String']
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection('/chatter', string.__msgtype__, typestore=store)
        for i in range(count):
            stamp = start_ns + i * period_ns
            writer.write(conn, stamp, store.serialize_cdr(string(data=f'msg {i}'), string.__msgtype__))
    return start_ns


def test_bag_replays_in_order_at_its_rate_with_clock(tmp_path):
    import rclpy
    from rosgraph_msgs.msg import Clock
    from std_msgs.msg import String
    start_ns = _write_bag(tmp_path / 'bag', count=10, period_ns=100_000_000)   # 10 Hz for 0.9 s
    rclpy.init()
    node = rclpy.create_node('player_test_listener')
    got, clocks = [], []
    node.create_subscription(String, '/chatter', lambda m: got.append((m.data, time.monotonic())), 100)
    node.create_subscription(Clock, '/clock', lambda m: clocks.append(m.clock.sec * 10**9 + m.clock.nanosec), 100)
    player = subprocess.Popen([sys.executable, '-m', 'fol_ros.tools.player', str(tmp_path / 'bag'), '--clock',
                               '--wait-for-subscribers', '/chatter'], env=ros_env())
    try:
        deadline = time.monotonic() + 60
        while len(got) < 10 and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
        assert player.wait(timeout=30) == 0
    finally:
        player.kill()
        node.destroy_node()
        rclpy.shutdown()
    assert [g[0] for g in got] == [f'msg {i}' for i in range(10)]
    span = got[-1][1] - got[0][1]
    assert 0.6 < span < 2.0, f'10 messages 0.1 s apart took {span:.2f} s'
    assert clocks and min(clocks) >= start_ns and max(clocks) <= start_ns + 900_000_000
    assert clocks == sorted(clocks)

"""`fol-ros-play`: replay a rosbag2 over DDS at the bag's rate, like `ros2 bag play --clock` (absent from PyPI).

Messages are published as the bag's own CDR bytes, so any message type whose Python package is installed replays
bit-exactly. With --clock, /clock carries the bag time (consumers run with use_sim_time:=true).
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosbags.highlevel import AnyReader
from rosgraph_msgs.msg import Clock

CLOCK_PERIOD_S = 0.025   # 40 Hz, the rate ros2 bag play publishes /clock at


def message_class(type_name: str) -> type:
    """'sensor_msgs/msg/Image' -> sensor_msgs.msg.Image."""
    package, _, name = type_name.split('/')
    return getattr(importlib.import_module(f'{package}.msg'), name)


def _stamp(ns: int):
    from builtin_interfaces.msg import Time
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


class BagPlayer(Node):
    """Publishes a bag's messages at their recorded pace (scaled by `rate`)."""

    def __init__(self, bag: pathlib.Path, topics: list[str] | None, rate: float, clock: bool) -> None:
        super().__init__('fol_ros_bag_player')
        self.bag, self.rate = bag, rate
        self.reader = AnyReader([bag])
        self.reader.open()
        self.connections = [c for c in self.reader.connections if not topics or c.topic in topics]
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.publishers_by_topic = {c.topic: self.create_publisher(message_class(c.msgtype), c.topic, qos)
                                    for c in self.connections}
        self.clock_publisher = self.create_publisher(Clock, '/clock', 10) if clock else None
        self.published = 0

    def wait_for_subscribers(self, topics: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for topic in topics:
            while self.publishers_by_topic[topic].get_subscription_count() == 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f'no subscriber on {topic} after {timeout_s:.0f} s')
                rclpy.spin_once(self, timeout_sec=0.05)

    def _publish_clock(self, bag_ns: int) -> None:
        if self.clock_publisher is not None:
            self.clock_publisher.publish(Clock(clock=_stamp(bag_ns)))

    def play(self) -> int:
        start_wall, start_bag = None, None
        for connection, bag_ns, raw in self.reader.messages(connections=self.connections):
            if start_wall is None:
                start_wall, start_bag = time.monotonic(), bag_ns
            due = start_wall + (bag_ns - start_bag) / 1e9 / self.rate
            while (left := due - time.monotonic()) > 0:   # keep /clock ticking between messages
                self._publish_clock(start_bag + int((time.monotonic() - start_wall) * self.rate * 1e9))
                time.sleep(min(left, CLOCK_PERIOD_S))
            self._publish_clock(bag_ns)
            self.publishers_by_topic[connection.topic].publish(bytes(raw))
            self.published += 1
        self.reader.close()
        return self.published


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='fol-ros-play', description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('bag', type=pathlib.Path, help='rosbag2 directory (sqlite3 or MCAP)')
    parser.add_argument('--topics', nargs='*', help='only these topics (default: all)')
    parser.add_argument('--rate', type=float, default=1.0, help='playback speed factor')
    parser.add_argument('--clock', action='store_true', help='publish /clock from the bag time')
    parser.add_argument('--wait-for-subscribers', nargs='*', default=[], metavar='TOPIC',
                        help='start only once each of these topics has a subscriber')
    parser.add_argument('--wait-timeout', type=float, default=60.0, help='seconds to wait for subscribers')
    argv = sys.argv if argv is None else argv   # argv[0] is the program name, as in sys.argv
    args = parser.parse_args(rclpy.utilities.remove_ros_args(argv)[1:])
    rclpy.init(args=argv)
    player = BagPlayer(args.bag, args.topics, args.rate, args.clock)
    try:
        player.wait_for_subscribers(args.wait_for_subscribers, args.wait_timeout)
        count = player.play()
        player.get_logger().info(f'published {count} messages from {args.bag}')
        time.sleep(0.5)   # let the last reliable samples drain before the participant goes away
        return 0
    except (KeyboardInterrupt, TimeoutError) as exc:
        player.get_logger().error(str(exc) or 'interrupted')
        return 1
    finally:
        player.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())

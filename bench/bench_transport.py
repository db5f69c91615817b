"""DDS transport bench (issue 16.2): share of raw camera frames that reach a subscriber in another process.

For 640x480 and 1280x720 rgb8 Images at 10, 30 and 100 Hz, with Fast DDS's default transports and with
config/fastdds_camera_localhost.xml (a 32 MiB shared-memory segment), a publisher process sends frames for a few
seconds to a plain subscriber process (no model: this measures the transport, not the node) with the node's
default camera QoS (best effort, depth 1) and, with --reliable, reliable depth 10. Prints a table and writes JSON
to bench/results/transport.json.

    python bench/bench_transport.py [--seconds 3] [--reliable]

DDS stays on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, the loopback variant of the profile).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PROFILE = REPO / 'config' / 'fastdds_camera_localhost.xml'
SIZES = {'640x480': (480, 640), '1280x720': (720, 1280)}
RATES = (10.0, 30.0, 100.0)


def _qos(reliable: bool):
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10 if reliable else 1,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)


def publisher(size: str, rate: float, seconds: float, reliable: bool) -> dict:
    """Wait for the subscriber, publish frames at `rate` for `seconds`, report what was published."""
    import numpy as np
    import rclpy
    from sensor_msgs.msg import Image
    rclpy.init()
    node = rclpy.create_node('bench_transport_pub')
    pub = node.create_publisher(Image, 'bench_image', _qos(reliable))
    h, w = SIZES[size]
    data = np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8).tobytes()
    msg = Image(height=h, width=w, encoding='rgb8', step=w * 3, data=data)
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    time.sleep(0.5)   # let the reader finish matching before the clock starts
    published, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        msg.header.stamp.sec, msg.header.stamp.nanosec = 1, published
        pub.publish(msg)
        published += 1
        next_at = start + published / rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    elapsed = time.monotonic() - start
    time.sleep(1.0)   # frames in flight arrive before the publisher disappears
    node.destroy_node()
    rclpy.try_shutdown()
    return {'published': published, 'publish_rate_hz': published / elapsed}


def subscriber(timeout_s: float, reliable: bool) -> dict:
    """Count distinct frames until SIGTERM (sent once the publisher is done) or timeout_s."""
    import signal
    import rclpy
    from sensor_msgs.msg import Image
    rclpy.init()
    node = rclpy.create_node('bench_transport_sub')
    seen: set[int] = set()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    def on_image(msg) -> None:
        seen.add(msg.header.stamp.nanosec)

    node.create_subscription(Image, 'bench_image', on_image, _qos(reliable))
    print('ready', flush=True)
    start = time.monotonic()
    while time.monotonic() - start < timeout_s and not stop:
        rclpy.spin_once(node, timeout_sec=0.05)
    node.destroy_node()
    rclpy.try_shutdown()
    return {'received': len(seen)}


def _env(profile: bool, domain: int) -> dict:
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_LOCALHOST_ONLY='1',
               ROS_DOMAIN_ID=str(domain), PYTHONUNBUFFERED='1')
    for key in ('FASTRTPS_DEFAULT_PROFILES_FILE', 'FASTDDS_DEFAULT_PROFILES_FILE'):
        env.pop(key, None)
        if profile:
            env[key] = str(PROFILE)
    return env


def run_case(size: str, rate: float, profile: bool, seconds: float, reliable: bool, domain: int) -> dict:
    env = _env(profile, domain)
    rel = ['--reliable'] if reliable else []
    sub = subprocess.Popen([sys.executable, __file__, '--role', 'sub', '--seconds', str(seconds), *rel],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert sub.stdout.readline().strip() == 'ready', sub.stderr.read()
    pub = subprocess.run([sys.executable, __file__, '--role', 'pub', '--size', size, '--rate', str(rate),
                          '--seconds', str(seconds), *rel], env=env, capture_output=True, text=True,
                         timeout=seconds + 60)
    sub.terminate()   # the publisher waited 1 s for frames in flight before it exited
    out, err = sub.communicate(timeout=30)
    for name, text in (('publisher', pub.stderr), ('subscriber', err)):
        if 'error' in text.lower():
            print(f'[{name} stderr] {text.strip()[:500]}', file=sys.stderr)
    sent = json.loads(pub.stdout.strip().splitlines()[-1])
    got = json.loads(out.strip().splitlines()[-1])
    return {'size': size, 'rate_hz': rate, 'profile': profile, 'reliable': reliable, **sent, **got,
            'received_share': got['received'] / max(sent['published'], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=3.0, help='publishing time per case')
    parser.add_argument('--reliable', action='store_true', help='reliable depth 10 instead of best effort depth 1')
    parser.add_argument('--role', choices=('pub', 'sub'), help=argparse.SUPPRESS)
    parser.add_argument('--size', choices=tuple(SIZES), help=argparse.SUPPRESS)
    parser.add_argument('--rate', type=float, help=argparse.SUPPRESS)
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'transport.json'))
    args = parser.parse_args()
    if args.role == 'pub':
        print(json.dumps(publisher(args.size, args.rate, args.seconds, args.reliable)))
        return 0
    if args.role == 'sub':
        print(json.dumps(subscriber(timeout_s=args.seconds + 90, reliable=args.reliable)))
        return 0
    domain = int(os.environ.get('FOL_ROS_BENCH_DOMAIN_ID', 90))
    rows = []
    qos = 'reliable depth 10' if args.reliable else 'best effort depth 1'
    print(f'raw rgb8 Images, publisher and subscriber in two processes, {qos}, {args.seconds:.0f} s per case')
    print(f'{"size":>9} {"rate":>6} {"profile":>8} {"published":>9} {"received":>8} {"share":>6}')
    for size in SIZES:
        for rate in RATES:
            for profile in (False, True):
                row = run_case(size, rate, profile, args.seconds, args.reliable, domain)
                rows.append(row)
                print(f'{size:>9} {rate:>6.0f} {"32MB SHM" if profile else "default":>8} {row["published"]:>9} '
                      f'{row["received"]:>8} {row["received_share"]:>6.1%}', flush=True)
    out = pathlib.Path(args.out)
    if args.reliable and out.name == 'transport.json':
        out = out.with_name('transport_reliable.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'machine': platform.node(), 'cpus': os.cpu_count(),
                               'load_average': os.getloadavg(), 'qos': qos, 'seconds': args.seconds,
                               'profile': str(PROFILE.relative_to(REPO)), 'rows': rows}, indent=1))
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

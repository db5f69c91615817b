"""place_recognition_node and fol-ros-posegraph as real processes over DDS (loopback): a revisit of 48 Corridor
places is streamed with drifting odometry; the pose graph's optimised path must remove most of the drift.

The revisit shows the map's own images (seeded tiny FoL model: recognition quality is tested elsewhere), so every
accepted closure is true and the ground truth of frame i is place i; what is tested here is the SLAM side: odometry
and LoopClosure messages into GTSAM, the Path out, and the ATE drop measured with evo."""
import threading

import pytest
from nav_msgs.msg import Odometry, Path
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from conftest import ros_env
from fixtures.node_harness import Client, NodeProcess, rclpy_context, read_rgb, set_stamp
from fol_ros.demo.sequence import OdometryDrift, drifting_odometry
from fol_ros.posegraph import Trajectory, ate_rmse
from fol_ros.records import Pose

pytestmark = pytest.mark.ros
S = 10**9
N = 48
SPACING_M = 1.0
NS = 'pgdds'


class PoseGraphProcess(NodeProcess):
    """`python -m fol_ros.ros.posegraph_node --ros-args ...` in the test's namespace."""

    def __init__(self, env, log_path, **params) -> None:
        import subprocess
        import sys
        from fixtures.node_harness import REPO, _yaml
        args = [sys.executable, '-m', 'fol_ros.ros.posegraph_node', '--ros-args', '-r', f'__ns:=/{NS}']
        for key, value in params.items():
            args += ['-p', f'{key.replace("__", ".")}:={_yaml(value)}']
        self.log_path = log_path
        self._log = open(log_path, 'w')
        self.proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)


def odometry_msg(stamp_ns: int, pose: Pose) -> Odometry:
    msg = Odometry()
    set_stamp(msg.header, stamp_ns)
    msg.header.frame_id, msg.child_frame_id = 'odom', 'base_link'
    p = msg.pose.pose
    p.position.x, p.position.y, p.position.z = pose.position
    p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w = pose.orientation
    return msg


def test_posegraph_node_removes_the_drift_of_a_streamed_revisit(tmp_path, corridor_dir):
    from fol_ros.config import EngineConfig, ModelConfig
    from fol_ros.encode.base import create_encoder
    from fixtures.tiny_encoder import tiny_test_encoder
    from fol_ros.model.checkpoint import save_checkpoint
    checkpoint = save_checkpoint(tiny_test_encoder().net, tmp_path / 'tiny.pth', label='tiny test model')
    encoder = create_encoder(ModelConfig(checkpoint=str(checkpoint), input_size=(294, 294)),
                             EngineConfig(engine='torch', device='cpu'))
    images = [read_rgb(p) for p in sorted((corridor_dir / 'ref').glob('*.jpg'))[:N]]
    # the map: place i at x = i m, stamped i s (built through PlaceMap with poses, as `fol-ros map build` does)
    from fol_ros.search.place_map import PlaceMap
    pmap = PlaceMap.create(encoder.info)
    for i in range(0, N, 8):
        for j, enc in enumerate(encoder.encode(images[i:i + 8]), start=i):
            pmap.add(enc, j * S, Pose((j * SPACING_M, 0.0, 0.0)))
    pmap.save(tmp_path / 'map')
    truth = [Pose((i * SPACING_M, 0.0, 0.0)) for i in range(N)]
    odom = drifting_odometry(truth, OdometryDrift(scale_error=0.05, heading_bias_rad_per_m=0.004))
    stamps = [1000 * S + i * S for i in range(N)]

    rclpy_context()
    env = ros_env()
    node = NodeProcess(env, tmp_path / 'node.log', namespace=NS, map_path=str(tmp_path / 'map'),
                       **{'model.checkpoint': str(checkpoint), 'model.input_size': [294, 294],
                          'engine.engine': 'torch', 'engine.device': 'cpu', 'search.top_k': 5, 'rerank.top_k': 2,
                          'verify.method': 'none', 'qos_reliability': 'reliable', 'qos_depth': 10,
                          'max_rate_hz': 0.0})
    graph = PoseGraphProcess(env, tmp_path / 'posegraph.log', graph__place_spacing_m=SPACING_M)
    client = Client('pg_client', namespace=NS)
    paths: list[Path] = []
    got_path = threading.Event()

    def on_path(msg: Path) -> None:
        paths.append(msg)
        got_path.set()

    client.create_subscription(Path, 'posegraph/path', on_path,
                               QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                          durability=DurabilityPolicy.TRANSIENT_LOCAL))
    try:
        client.wait_subscribed(client.image_pub, timeout=120)
        client.wait_subscribed(client.odom_pub, timeout=60)
        for i in range(N):
            client.odom_pub.publish(odometry_msg(stamps[i], odom[i]))
            client.send_image(images[i], stamps[i])
            client.wait_result(stamps[i], timeout=60)
        assert len(client.loops) >= N // 2, f'{len(client.loops)} loop closures'
        last_closure = max(m.query_stamp.sec * S + m.query_stamp.nanosec for m in client.loops)

        def path_done():
            return paths and len(paths[-1].poses) >= N and any(
                p.header.stamp.sec * S + p.header.stamp.nanosec >= last_closure for p in paths[-1].poses)
        client.wait_until(path_done, 30, 'the optimised path after the last closure')
    finally:
        client.close()
        node_code, graph_code = node.stop(), graph.stop()
    assert graph_code == 0 and 'Traceback' not in graph.log(), graph.log()[-3000:]
    assert node_code == 0, node.log()[-3000:]
    closed = Trajectory.from_poses(
        (p.header.stamp.sec * S + p.header.stamp.nanosec,
         Pose((p.pose.position.x, p.pose.position.y, p.pose.position.z),
              (p.pose.orientation.x, p.pose.orientation.y, p.pose.orientation.z, p.pose.orientation.w)))
        for p in paths[-1].poses)
    gt = Trajectory.from_poses(zip(stamps, truth))
    ate_odom = ate_rmse(gt, Trajectory.from_poses(zip(stamps, odom)))
    ate_closed = ate_rmse(gt, closed)
    assert ate_odom > 1.5, ate_odom
    assert ate_closed < 0.3 * ate_odom, (ate_odom, ate_closed, len(client.loops))
    assert 'loop closure' in graph.log()

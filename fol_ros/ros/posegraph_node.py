"""`fol-ros-posegraph`: the loop closures of place_recognition_node in a real pose-graph back end (GTSAM).

This is the integration example for a SLAM user. It listens to

* `odom_topic` (nav_msgs/Odometry): the robot's drifting odometry; consecutive keyframes become between-factors;
* `loop_closure_topic` (fol_ros/LoopClosure): every closure the node's gates accepted; each becomes a robust
  (DCS) between-factor to the matched place: the message's relative pose and covariance when it has one, otherwise
  "at the matched place" (candidate.pose) with one place spacing of uncertainty;

and publishes

* `path_topic` (nav_msgs/Path): the whole optimised trajectory in `map_frame`, after every change (latched);
* `pose_topic` (geometry_msgs/PoseWithCovarianceStamped): the latest map-frame pose at every odometry sample,
  with the marginal covariance of the newest keyframe.

All the estimation is in `fol_ros.posegraph` (ROS-free); this file only converts messages.

    fol-ros-posegraph --ros-args -p odom_topic:=/odom -p loop_closure_topic:=/loop_closure
    ros2 run fol_ros posegraph_node --ros-args -p graph.robust_kernel:=dcs
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import rclpy
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from nav_msgs.msg import Path as PathMsg
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

from fol_ros.errors import ConfigError
from fol_ros.msg import LoopClosure
from fol_ros.posegraph import LoopConstraint, LoopPoseGraph, PoseGraphSettings
from fol_ros.records import Pose
from fol_ros.ros.run import close_node, spin_until_signal

log = logging.getLogger(__name__)
_NS = 1_000_000_000


@dataclass(frozen=True)
class PoseGraphNodeSettings:
    """Parameters of fol-ros-posegraph. The graph's own settings are parameters `graph.<field>` of
    `fol_ros.posegraph.PoseGraphSettings` (sigmas, keyframe spacing, robust kernel).

    Attributes:
        odom_topic: nav_msgs/Odometry in.
        loop_closure_topic: fol_ros/LoopClosure in (the node's `loop_closure`).
        path_topic: nav_msgs/Path out, the optimised trajectory (transient local: a late subscriber gets the last).
        pose_topic: geometry_msgs/PoseWithCovarianceStamped out, the latest map-frame pose.
        map_frame: frame_id of the outputs (the frame of the map's place poses).
        trajectory_out: if set, a JSON file written at shutdown with the optimised and the odometry trajectories.
    """

    odom_topic: str = 'odom'
    loop_closure_topic: str = 'loop_closure'
    path_topic: str = 'posegraph/path'
    pose_topic: str = 'posegraph/pose'
    map_frame: str = 'map'
    trajectory_out: str = ''
    graph: PoseGraphSettings = field(default_factory=PoseGraphSettings)


def declare_settings(node: Node) -> PoseGraphNodeSettings:
    """One ROS parameter per dataclass field (`graph.*` for the graph); validated by the dataclasses."""
    def read(cls, prefix: str) -> dict:
        values = {}
        for f in dataclasses.fields(cls):
            if f.name == 'graph':
                continue
            default = getattr(cls(), f.name)
            value = node.declare_parameter(prefix + f.name, list(default) if isinstance(default, tuple)
                                           else default).value
            values[f.name] = tuple(float(v) for v in value) if isinstance(default, tuple) else value
        return values
    return PoseGraphNodeSettings(**read(PoseGraphNodeSettings, ''),
                                 graph=PoseGraphSettings(**read(PoseGraphSettings, 'graph.')))


def stamp_ns(t) -> int:
    return int(t.sec) * _NS + int(t.nanosec)


def to_stamp(ns: int, msg_stamp) -> None:
    msg_stamp.sec, msg_stamp.nanosec = divmod(int(ns), _NS)


def pose_of(p) -> Pose:
    """geometry_msgs/Pose -> Pose."""
    return Pose((p.position.x, p.position.y, p.position.z),
                (p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w))


def set_pose(target, pose: Pose) -> None:
    """Pose -> geometry_msgs/Pose (in place)."""
    target.position.x, target.position.y, target.position.z = pose.position
    o = target.orientation
    o.x, o.y, o.z, o.w = pose.orientation


def constraint_from_msg(msg: LoopClosure) -> LoopConstraint:
    """A LoopClosure message as the graph's LoopConstraint (poses and covariance kept as the message states)."""
    c = msg.candidate
    return LoopConstraint(
        query_stamp_ns=stamp_ns(msg.query_stamp), match_stamp_ns=stamp_ns(msg.match_stamp),
        match_place_id=int(msg.match_place_id),
        place_pose=pose_of(c.pose) if c.pose_known else None,
        relative_pose=pose_of(msg.relative_pose.pose) if msg.has_relative_pose else None,
        relative_covariance=tuple(float(v) for v in msg.relative_pose.covariance),
        translation_scale_known=bool(msg.translation_scale_known))


class PoseGraphNode(Node):
    """Odometry + loop closures in, optimised Path and latest pose out."""

    def __init__(self) -> None:
        super().__init__('fol_ros_posegraph')
        self.settings = declare_settings(self)
        s = self.settings
        self.graph = LoopPoseGraph(s.graph)
        self.odometry: list[tuple[int, Pose]] = []
        # Closures are rare and each one matters: reliable, deep. Odometry may be fast: keep a deep queue too,
        # a missing sample only lengthens one between-factor.
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.create_subscription(Odometry, s.odom_topic, self._on_odometry, reliable)
        self.create_subscription(LoopClosure, s.loop_closure_topic, self._on_loop_closure, reliable)
        self.path_pub = self.create_publisher(PathMsg, s.path_topic, latched)
        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, s.pose_topic, 10)
        self.get_logger().info(
            f'pose graph on {s.odom_topic} + {s.loop_closure_topic} -> {s.path_topic}, {s.pose_topic} '
            f'(robust kernel {s.graph.robust_kernel}, parameter {s.graph.robust_parameter})')

    def _on_odometry(self, msg: Odometry) -> None:
        t, pose = stamp_ns(msg.header.stamp), pose_of(msg.pose.pose)
        self.odometry.append((t, pose))
        n_closures = len(self.graph.closures)
        if self.graph.add_odometry(t, pose) or len(self.graph.closures) != n_closures:
            # a new keyframe, or a closure that waited for this odometry: solve, then show the whole trajectory
            self.graph.optimise()
            self._publish_path()
        self._publish_pose()

    def _on_loop_closure(self, msg: LoopClosure) -> None:
        if self.graph.add_loop_closure(constraint_from_msg(msg)):
            self.graph.optimise()
            self._publish_path()
            weights = self.graph.closure_weights()
            self.get_logger().info(
                f'loop closure {len(self.graph.closures)}: query t={stamp_ns(msg.query_stamp) / _NS:.1f} -> '
                f'place {msg.match_place_id}; closures treated as outliers so far: '
                f'{sum(w < 0.1 for w in weights)}')

    def _publish_path(self) -> None:
        out = PathMsg()
        out.header.frame_id = self.settings.map_frame
        for t, pose in self.graph.trajectory(self.settings.map_frame).poses():
            p = PoseStamped()
            p.header.frame_id = self.settings.map_frame
            to_stamp(t, p.header.stamp)
            set_pose(p.pose, pose)
            out.poses.append(p)
        if out.poses:
            out.header.stamp = out.poses[-1].header.stamp
        self.path_pub.publish(out)

    def _publish_pose(self) -> None:
        latest = self.graph.latest_pose()
        if latest is None:
            return
        t, pose, cov = latest
        out = PoseWithCovarianceStamped()
        out.header.frame_id = self.settings.map_frame
        to_stamp(t, out.header.stamp)
        set_pose(out.pose.pose, pose)
        out.pose.covariance = [float(v) for v in cov.reshape(-1)]
        self.pose_pub.publish(out)

    def finish(self) -> None:
        """Last solve; write `trajectory_out` when set."""
        self.graph.optimise()
        self._publish_path()
        if self.settings.trajectory_out:
            from fol_ros.posegraph import Trajectory
            path = Path(self.settings.trajectory_out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({
                'loop_closed': self.graph.trajectory().to_json(),
                'odometry': Trajectory.from_poses(self.odometry).to_json(),
                'n_loop_closures': len(self.graph.closures), 'closure_weights': self.graph.closure_weights()}))
        self.get_logger().info(f'{len(self.graph.keyframes)} keyframes, {len(self.graph.closures)} loop closures '
                               f'({self.graph.rejected} unusable)')


def main(argv: list[str] | None = None) -> int:
    """Spin until SIGINT/SIGTERM, then solve once more and write the trajectory (if asked)."""
    rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        node = PoseGraphNode()
    except ConfigError as exc:          # a bad parameter: say which, no traceback
        logging.getLogger('fol_ros_posegraph').error('%s', exc)
        rclpy.try_shutdown()
        return 2
    try:
        spin_until_signal(node)
        node.finish()
    finally:
        close_node(node)
    return 0


if __name__ == '__main__':
    sys.exit(main())

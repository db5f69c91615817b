"""`fol-ros-recorder`: scores a running place-recognition node live, e.g. during `ros2 bag play --clock`.

It subscribes to the node's PlaceRecognition and LoopClosure outputs and to the bag's pose topic, and at shutdown
(Ctrl-C, SIGTERM) writes the same JSON metrics as `fol-ros eval --bag` (Recall@N, loop-closure precision-recall,
latencies), plus the HTML report. Places come from `map_path` when given (every place of the map), else from the
node's own keyframes (`added_place_id`, positioned with the pose at that frame) and the poses its candidates carry.

`pose_topic` is the ground truth (positives within `radius_m`). With `odom_topic` (the robot's odometry,
nav_msgs/Odometry) and `path_topic` (fol-ros-posegraph's optimised nav_msgs/Path) it also scores the trajectories:
`trajectory.ate_odometry_m` vs `trajectory.ate_loop_closed_m` against the ground truth (evo APE, RMSE).

    ros2 run fol_ros loop_closure_recorder --ros-args -p pose_topic:=/ground_truth -p out:=live.json \
        -p odom_topic:=/odom -p path_topic:=/posegraph/path
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import rclpy
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

from fol_ros.eval.scoring import StreamScorer
from fol_ros.pose_track import PoseTrack
from fol_ros.msg import LoopClosure, PlaceRecognition
from fol_ros.records import Pose
from fol_ros.ros.run import close_node, spin_until_signal

log = logging.getLogger(__name__)
_NS = 1_000_000_000
POSE_TYPES = {
    'geometry_msgs/msg/PoseStamped': ('geometry_msgs.msg', 'PoseStamped', lambda m: m.pose.position),
    'geometry_msgs/msg/PoseWithCovarianceStamped':
        ('geometry_msgs.msg', 'PoseWithCovarianceStamped', lambda m: m.pose.pose.position),
    'nav_msgs/msg/Odometry': ('nav_msgs.msg', 'Odometry', lambda m: m.pose.pose.position),
}


def stamp_ns(t) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(t.sec) * _NS + int(t.nanosec)


class LoopClosureRecorder(Node):
    """Buffers the node's outputs and the poses; `finish()` scores them and writes the result."""

    def __init__(self) -> None:
        super().__init__('fol_ros_recorder')
        p = self.declare_parameter
        self.pr_topic = p('place_recognition_topic', 'place_recognition').value
        self.lc_topic = p('loop_closure_topic', 'loop_closure').value
        self.pose_topic = p('pose_topic', 'odom').value
        self.pose_type = p('pose_type', 'nav_msgs/msg/Odometry').value
        self.out = Path(p('out', 'fol_ros_live.json').value)
        self.report = p('report', True).value
        self.radius_m = float(p('radius_m', 25.0).value)
        self.exclude_recent_s = float(p('exclude_recent_s', 30.0).value)
        self.exclude_recent_places = int(p('exclude_recent_places', 20).value)
        self.map_path = p('map_path', '').value
        self.log_every = int(p('log_every', 50).value)
        self.odom_topic = p('odom_topic', '').value
        self.path_topic = p('path_topic', '').value
        if self.pose_type not in POSE_TYPES:
            raise ValueError(f'pose_type {self.pose_type!r} is not one of {", ".join(POSE_TYPES)}')
        module, name, self._position_of = POSE_TYPES[self.pose_type]
        pose_cls = getattr(__import__(module, fromlist=[name]), name)
        qos = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
        self.create_subscription(PlaceRecognition, self.pr_topic, self._on_place_recognition, qos)
        self.create_subscription(LoopClosure, self.lc_topic, self._on_loop_closure, qos)
        self.create_subscription(pose_cls, self.pose_topic, self._on_pose, qos)
        self.poses = PoseTrack()
        self.ground_truth: list[tuple[int, Pose]] = []
        self.odometry: list[tuple[int, Pose]] = []
        self.path = None
        if self.odom_topic and self.path_topic:
            from nav_msgs.msg import Odometry, Path as PathMsg
            from rclpy.qos import DurabilityPolicy
            self.create_subscription(Odometry, self.odom_topic, self._on_odometry, qos)
            # the pose graph latches its path: the last one is the whole optimised trajectory
            latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self.create_subscription(PathMsg, self.path_topic, self._on_path, latched)
        self.frames: list[PlaceRecognition] = []
        self.accepted_stamps: set[int] = set()
        self.get_logger().info(f'recording {self.pr_topic}, {self.lc_topic} and {self.pose_topic} '
                               f'({self.pose_type}); results go to {self.out} at shutdown')

    def _on_pose(self, msg) -> None:
        pos = self._position_of(msg)
        self.poses.add(stamp_ns(msg.header.stamp), (pos.x, pos.y, pos.z))
        self.ground_truth.append((stamp_ns(msg.header.stamp), Pose((pos.x, pos.y, pos.z))))

    def _on_odometry(self, msg) -> None:
        p = msg.pose.pose
        self.odometry.append((stamp_ns(msg.header.stamp), Pose((p.position.x, p.position.y, p.position.z),
                                                                (p.orientation.x, p.orientation.y,
                                                                 p.orientation.z, p.orientation.w))))

    def _on_path(self, msg) -> None:
        self.path = msg

    def _on_loop_closure(self, msg: LoopClosure) -> None:
        self.accepted_stamps.add(stamp_ns(msg.query_stamp))

    def _on_place_recognition(self, msg: PlaceRecognition) -> None:
        self.frames.append(msg)
        if self.log_every > 0 and len(self.frames) % self.log_every == 0:
            self.get_logger().info(f'frames received: {len(self.frames)} '
                                   f'(last stamp {stamp_ns(msg.header.stamp)} ns)')

    def finish(self) -> dict:
        """Score everything received (frames in stamp order, ground truth as `fol-ros eval --bag`) and write it."""
        scorer = StreamScorer(radius_m=self.radius_m)
        if self.map_path:
            from fol_ros.eval.bag import load_map_places
            for place_id, stamp, position in load_map_places(self.map_path):
                scorer.add_place(place_id, stamp, position)
        recent: list[int] = []
        for msg in sorted(self.frames, key=lambda m: stamp_ns(m.header.stamp)):
            self._score_frame(scorer, msg, recent)
        result = {'protocol': 'live', 'bag': {'path': f'live: {self.pr_topic}'},
                  'settings': {'radius_m': self.radius_m, 'exclude_recent_s': self.exclude_recent_s,
                               'exclude_recent_places': self.exclude_recent_places, 'map_path': self.map_path,
                               'pose_topic': self.pose_topic, 'n_loop_closures': len(self.accepted_stamps)},
                  **scorer.result()}
        trajectory = self._trajectory()
        if trajectory is not None:
            result['trajectory'] = trajectory
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=1))
        if self.report:
            from fol_ros.eval.report import write_report
            write_report(result, self.out.with_suffix('.html'))
        return result

    def _trajectory(self) -> dict | None:
        """ATE of the odometry and of the pose graph's last path against the ground truth, when all three came."""
        if not (self.ground_truth and self.odometry and self.path is not None and self.path.poses):
            if self.odom_topic and self.path_topic:
                self.get_logger().warning(
                    f'no trajectory error: received {len(self.ground_truth)} ground-truth poses, '
                    f'{len(self.odometry)} odometry poses, {len(self.path.poses) if self.path else 0} path poses')
            return None
        from fol_ros.posegraph import Trajectory, trajectory_errors
        closed = Trajectory.from_poses(
            (stamp_ns(p.header.stamp), Pose((p.pose.position.x, p.pose.position.y, p.pose.position.z),
                                            (p.pose.orientation.x, p.pose.orientation.y, p.pose.orientation.z,
                                             p.pose.orientation.w))) for p in self.path.poses)
        return trajectory_errors(Trajectory.from_poses(self.ground_truth), Trajectory.from_poses(self.odometry),
                                 closed)

    def _score_frame(self, scorer: StreamScorer, msg: PlaceRecognition, recent: list[int]) -> None:
        t = stamp_ns(msg.header.stamp)
        position = self.poses.position_at(t)
        for c in msg.candidates:
            if c.pose_known:
                scorer.add_place(c.place_id, stamp_ns(c.place_stamp), (c.pose.position.x, c.pose.position.y,
                                                                       c.pose.position.z))
        positives = []
        if position is not None:
            max_stamp = t - int(self.exclude_recent_s * _NS) if self.exclude_recent_s > 0 else None
            positives = scorer.positives(position, max_stamp, recent[-self.exclude_recent_places:]
                                         if self.exclude_recent_places > 0 else ())
        cands = list(msg.candidates)
        lat = msg.latency
        scorer.add_frame(
            t, position, positives,
            pred_global=[c.place_id for c in sorted(cands, key=lambda c: c.retrieval_rank)],
            pred_rerank=[c.place_id for c in cands],
            scores=({'confidence': float(cands[0].confidence), 'local_matches': float(cands[0].local_matches),
                     'global_similarity': float(cands[0].global_similarity)} if cands else {}),
            accepted=t in self.accepted_stamps,
            timings_ms={'preprocess': lat.preprocess_ms, 'encode': lat.encode_ms, 'search': lat.search_ms,
                        'rerank': lat.rerank_ms, 'verify': lat.verify_ms, 'total': lat.total_ms},
            added_place_id=msg.added_place_id, status=msg.status)
        if msg.added_place_id >= 0:
            # A keyframe joins the candidate set only after this frame, like in the node.
            scorer.add_place(msg.added_place_id, t, position)
            recent.append(int(msg.added_place_id))


def main(argv: list[str] | None = None) -> int:
    """Spin until SIGINT/SIGTERM, then write the metrics."""
    # Our own handlers: the default one would raise inside spin before the metrics are written.
    rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    node = LoopClosureRecorder()
    try:
        spin_until_signal(node)
        result = node.finish()
        lc = result['loop_closure']['curve']
        node.get_logger().info(
            f'scored {result["n_frames_scored"]} frames: R@1 global {result["recall_global"].get("1", 0):.3f}, '
            f're-ranked {result["recall_rerank"].get("1", 0):.3f}; loop-closure AUC {lc["auc"]:.3f}; '
            f'written {node.out}')
        if 'trajectory' in result:
            t = result['trajectory']
            node.get_logger().info(f'ATE (RMSE) odometry {t["ate_odometry_m"]:.3f} m, with FoL loop closures '
                                   f'{t["ate_loop_closed_m"]:.3f} m')
    finally:
        close_node(node)
    return 0


if __name__ == '__main__':
    sys.exit(main())

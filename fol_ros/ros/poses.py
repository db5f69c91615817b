"""Where the node takes each camera frame's pose from (setting `pose_source`).

* `odom`: a nav_msgs/Odometry topic; a frame gets the odometry sample nearest to its stamp (the same lookup as
  `fol-ros eval --bag`). Works on the pip route.
* `tf`: the transform map_frame <- camera frame at the frame's stamp, from tf2 (the usual source on a robot, where
  the camera frame hangs off the robot's TF tree). The camera frame is `camera_frame`, or the image header's
  frame_id when that is empty. The lookup waits up to `tf_timeout_s` for TF to catch up with the image (TF is
  published a little later than the images it describes). Needs tf2_ros (every ROS install has it; there is no
  PyPI wheel, so the pip route keeps odometry).

Both answer `pose_at(stamp_ns, frame_id)` with a `records.Pose` or None, and keep the reason of the last miss.
"""
from __future__ import annotations

import threading

from fol_ros.errors import ConfigError
from fol_ros.pose_track import PoseTrack
from fol_ros.records import Pose


class OdometryPoses:
    """Odometry samples filled by the executor thread, read by the frame worker's thread."""

    source = 'odom'

    def __init__(self, maxlen: int = 400) -> None:
        self._track = PoseTrack(maxlen=maxlen)
        self._lock = threading.Lock()
        self.last_miss = ''

    def add(self, stamp_ns: int, pose: Pose) -> None:
        with self._lock:
            self._track.add(stamp_ns, pose)

    def pose_at(self, stamp_ns: int, frame_id: str = '') -> Pose | None:
        """The odometry pose nearest in time to the frame, whatever the gap (None before the first sample)."""
        with self._lock:
            pose = self._track.nearest(stamp_ns)
        if pose is None:
            self.last_miss = 'no odometry received yet'
        return pose


def pose_from_transform(transform) -> Pose:
    """geometry_msgs/TransformStamped (parent <- child) -> the child's Pose in the parent frame."""
    t, q = transform.transform.translation, transform.transform.rotation
    return Pose((t.x, t.y, t.z), (q.x, q.y, q.z, q.w), transform.header.frame_id)


class TfPoses:
    """Camera poses looked up in a tf2 buffer at each frame's stamp.

    Args:
        buffer: a tf2_ros.Buffer (anything with its `lookup_transform(target, source, time, timeout)`).
        map_frame: the frame the poses are expressed in (the target of the lookup).
        camera_frame: the camera's frame; '' = the image header's frame_id.
        timeout_s: how long one lookup waits for the transform at the frame's stamp.
    """

    source = 'tf'

    def __init__(self, buffer, map_frame: str, camera_frame: str = '', timeout_s: float = 0.1) -> None:
        self.buffer, self.map_frame, self.camera_frame, self.timeout_s = buffer, map_frame, camera_frame, timeout_s
        self.last_miss = ''

    def pose_at(self, stamp_ns: int, frame_id: str = '') -> Pose | None:
        from rclpy.duration import Duration
        from rclpy.time import Time
        source = self.camera_frame or frame_id
        if not source:
            self.last_miss = ('the image has no header.frame_id and camera_frame is empty: set camera_frame to '
                              "the camera's TF frame")
            return None
        try:
            transform = self.buffer.lookup_transform(self.map_frame, source, Time(nanoseconds=int(stamp_ns)),
                                                     timeout=Duration(nanoseconds=int(self.timeout_s * 1e9)))
        except Exception as exc:   # tf2's Lookup/Connectivity/Extrapolation errors and a timeout alike
            self.last_miss = (f'no TF {self.map_frame} <- {source} at t={stamp_ns / 1e9:.3f} s '
                              f'({type(exc).__name__}: {exc})')
            return None
        return pose_from_transform(transform)


def tf_listener(node):
    """A tf2_ros Buffer filled by a TransformListener on `node` (its /tf and /tf_static subscriptions); ConfigError
    when tf2_ros is not installed. The node keeps the pair for its lifetime: destroying subscriptions that carry QoS
    event handlers while the executor waits is what crashed rclpy under lifecycle churn (issue 16.1)."""
    try:
        import tf2_ros
    except ImportError as exc:
        raise ConfigError(f'pose_source tf needs tf2_ros ({exc}): install it (apt install ros-$ROS_DISTRO-tf2-ros, '
                          'or rosdep install) or take poses from odometry (pose_source odom, odom_topic)') from exc
    buffer = tf2_ros.Buffer()
    return buffer, tf2_ros.TransformListener(buffer, node, spin_thread=False)

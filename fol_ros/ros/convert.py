"""Messages in and out: sensor_msgs images -> RGB arrays, pipeline records -> fol_ros/geometry_msgs messages."""
from __future__ import annotations

import logging
import math

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose as PoseMsg, PoseWithCovariance, PoseWithCovarianceStamped, Quaternion
from std_msgs.msg import Float64MultiArray, Header

from fol_ros.errors import BadInputError
from fol_ros.image import decode_compressed, decode_raw
from fol_ros.msg import LoopClosure, PlaceCandidate, PlaceRecognition, StageLatency
from fol_ros.pipeline import Result
from fol_ros.records import Candidate, Pose, RelativePose, StageTimings
from fol_ros.verify.gate import Decision

log = logging.getLogger(__name__)
_NS = 1_000_000_000


def load_cv_bridge():
    """A cv_bridge.CvBridge when cv_bridge imports (a ROS install), else None (our own conversion is used)."""
    try:
        from cv_bridge import CvBridge
        return CvBridge()
    except Exception as exc:  # ImportError, or the numpy-2-incompatible PyPI package failing at import
        log.debug('cv_bridge unavailable (%s): using fol_ros.image', exc)
        return None


def image_to_rgb(msg, max_pixels: int, bridge=None) -> np.ndarray:
    """sensor_msgs/Image or CompressedImage -> RGB uint8 H x W x 3.

    Sizes, step and pixel budget are checked here first; cv_bridge (when given) then converts raw images, which
    adds encodings beyond fol_ros.image's six (e.g. yuv422, bayer).

    Raises:
        BadInputError: the image cannot be used (the message says why).
    """
    if hasattr(msg, 'format'):
        return decode_compressed(msg.data, max_pixels=max_pixels)
    if bridge is None:
        return decode_raw(msg.data, msg.width, msg.height, msg.encoding, msg.step,
                          is_bigendian=bool(msg.is_bigendian), max_pixels=max_pixels)
    if msg.width == 0 or msg.height == 0 or msg.width * msg.height > max_pixels:
        # reuse fol_ros.image's messages for zero size and the pixel budget
        decode_raw(b'', msg.width, msg.height, 'mono8', msg.width, max_pixels=max_pixels)
    if len(msg.data) != msg.step * msg.height or msg.step < msg.width:
        raise BadInputError(f'{msg.encoding} image {msg.width}x{msg.height} with step {msg.step} needs '
                            f'{msg.step * msg.height} bytes, got {len(msg.data)}')
    try:
        return np.ascontiguousarray(bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8'))
    except Exception as exc:  # CvBridgeError and the cv2 errors it lets through
        raise BadInputError(f'cv_bridge cannot convert {msg.encoding!r} to rgb8: {exc}') from exc


def to_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * _NS + int(stamp.nanosec)


def to_time(ns: int) -> Time:
    """Integer nanoseconds -> builtin_interfaces/Time (negative clamps to 0)."""
    ns = max(int(ns), 0)
    return Time(sec=ns // _NS, nanosec=ns % _NS)


def pose_to_msg(pose: Pose) -> PoseMsg:
    x, y, z = pose.position
    qx, qy, qz, qw = pose.orientation
    return PoseMsg(position=Point(x=float(x), y=float(y), z=float(z)),
                   orientation=Quaternion(x=float(qx), y=float(qy), z=float(qz), w=float(qw)))


def pose_from_odometry(msg) -> Pose:
    """nav_msgs/Odometry -> Pose in the odometry's frame."""
    p, q = msg.pose.pose.position, msg.pose.pose.orientation
    return Pose((p.x, p.y, p.z), (q.x, q.y, q.z, q.w), msg.header.frame_id or 'odom')


def candidate_to_msg(cand: Candidate, map_id: str) -> PlaceCandidate:
    out = PlaceCandidate(place_id=int(cand.place_id), map_id=map_id, place_stamp=to_time(cand.stamp_ns),
                         retrieval_rank=int(cand.retrieval_rank), global_similarity=float(cand.global_similarity),
                         local_matches=int(cand.local_matches), geometric_inliers=int(cand.geometric_inliers),
                         confidence=float(cand.confidence))
    if cand.pose is not None:
        out.pose, out.pose_frame_id, out.pose_known = pose_to_msg(cand.pose), cand.pose.frame_id, True
    else:
        out.pose.orientation.w = 1.0
    return out


def latency_to_msg(timings: StageTimings) -> StageLatency:
    """The pipeline's stage times as measured (total_ms: their sum, decoding included in preprocess_ms)."""
    return StageLatency(preprocess_ms=float(timings.preprocess_ms), encode_ms=float(timings.encode_ms),
                        search_ms=float(timings.search_ms), rerank_ms=float(timings.rerank_ms),
                        verify_ms=float(timings.verify_ms), total_ms=float(timings.total_ms))


def result_to_msg(result: Result, header: Header, seq: int, map_id: str, max_candidates: int) -> PlaceRecognition:
    """Pipeline result -> PlaceRecognition (at most max_candidates candidates, best first)."""
    return PlaceRecognition(
        header=header, query_seq=int(seq), status=int(result.status), status_message=result.message,
        map_id=map_id, candidates=[candidate_to_msg(c, map_id) for c in result.candidates[:max_candidates]],
        added_place_id=int(result.added_place_id), latency=latency_to_msg(result.timings))


def _quaternion(rotation: tuple[float, ...]) -> tuple[float, float, float, float]:
    """Row-major 3x3 rotation matrix -> unit quaternion (x, y, z, w)."""
    m = np.asarray(rotation, np.float64).reshape(3, 3)
    w = math.sqrt(max(0.0, 1.0 + m[0, 0] + m[1, 1] + m[2, 2])) / 2.0
    x = math.copysign(math.sqrt(max(0.0, 1.0 + m[0, 0] - m[1, 1] - m[2, 2])) / 2.0, m[2, 1] - m[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1.0 - m[0, 0] + m[1, 1] - m[2, 2])) / 2.0, m[0, 2] - m[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1.0 - m[0, 0] - m[1, 1] + m[2, 2])) / 2.0, m[1, 0] - m[0, 1])
    norm = math.sqrt(x * x + y * y + z * z + w * w) or 1.0
    return x / norm, y / norm, z / norm, w / norm


def relative_pose_to_msg(rel: RelativePose) -> PoseWithCovariance:
    pose = pose_to_msg(Pose(tuple(rel.translation), _quaternion(rel.rotation)))
    return PoseWithCovariance(pose=pose, covariance=[float(v) for v in rel.covariance])


def loop_closure_to_msg(result: Result, decision: Decision, header: Header, map_id: str) -> LoopClosure:
    """An accepted decision -> LoopClosure (relative pose only when verification estimated one)."""
    cand = decision.candidate
    out = LoopClosure(header=header, query_stamp=header.stamp, match_stamp=to_time(cand.stamp_ns),
                      query_place_id=int(result.added_place_id), match_place_id=int(cand.place_id), map_id=map_id,
                      candidate=candidate_to_msg(cand, map_id), temporal_support=int(decision.temporal_support),
                      confidence=float(cand.confidence))
    if cand.relative_pose is not None:
        out.relative_pose = relative_pose_to_msg(cand.relative_pose)
        out.has_relative_pose = True
        out.translation_scale_known = bool(cand.relative_pose.scale_known)
    else:
        out.relative_pose.pose.orientation.w = 1.0
    return out


def matched_pose_msg(cand: Candidate, header: Header, variances: tuple[float, ...],
                     map_frame: str) -> PoseWithCovarianceStamped:
    """The matched place's pose (initialpose-style): stamp of the query, frame of the map pose."""
    covariance = np.diag(np.asarray(variances, np.float64)).reshape(-1).tolist()
    out = PoseWithCovarianceStamped()
    out.header = Header(stamp=header.stamp, frame_id=cand.pose.frame_id or map_frame)
    out.pose = PoseWithCovariance(pose=pose_to_msg(cand.pose), covariance=covariance)
    return out


def time_pair_msg(query_ns: int, match_ns: int) -> Float64MultiArray:
    """LIO-SAM-style [t_query, t_match] in seconds."""
    return Float64MultiArray(data=[query_ns / _NS, match_ns / _NS])

"""Image and pose readers shared by map building, evaluation and training, and a rosbag2 writer.

Sources:
  * an image folder (sorted by file name) with an optional poses CSV `id,stamp,x,y,z,qx,qy,qz,qw`
    (id = file name or stem; stamp in seconds, or in nanoseconds when it is an integer above 1e14);
    without a CSV, image i gets stamp i seconds and no pose;
  * a rosbag2 (sqlite3 or MCAP, read with `rosbags`, no ROS installation needed): an Image or CompressedImage
    topic plus an optional nav_msgs/Odometry, geometry_msgs/PoseStamped or PoseWithCovarianceStamped topic,
    matched to each image by the nearest header stamp within a tolerance.
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fol_ros.errors import BadInputError, ConfigError
from fol_ros.pose_track import PoseTrack
from fol_ros.records import Pose

LOG = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')
IMAGE_TYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
POSE_TYPES = ('nav_msgs/msg/Odometry', 'geometry_msgs/msg/PoseStamped', 'geometry_msgs/msg/PoseWithCovarianceStamped')
_NS_THRESHOLD = 1e14


@dataclass
class Frame:
    """One camera frame: RGB uint8 [H, W, 3], stamp (ns), pose in `pose.frame_id` or None, provenance."""

    image: np.ndarray
    stamp_ns: int
    pose: Pose | None = None
    source: str = ''
    frame_id: str = ''


# ----- image folders -------------------------------------------------------------------------------------
def read_poses_csv(path: str | Path, frame_id: str = 'map') -> dict[str, tuple[int, Pose]]:
    """id -> (stamp ns, Pose) from a CSV `id,stamp,x,y,z,qx,qy,qz,qw` (a header row is optional)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'poses CSV {path} not found')
    out: dict[str, tuple[int, Pose]] = {}
    with open(path, newline='', encoding='utf-8') as handle:
        for line, row in enumerate(csv.reader(handle), 1):
            if not row or row[0].strip().startswith('#') or (line == 1 and row[0].strip().lower() == 'id'):
                continue
            if len(row) != 9:
                raise BadInputError(f'{path}:{line}: expected 9 columns id,stamp,x,y,z,qx,qy,qz,qw, got {len(row)}')
            try:
                vals = [float(v) for v in row[2:]]
                stamp = _stamp_ns(row[1].strip())
            except ValueError as exc:
                raise BadInputError(f'{path}:{line}: {exc}') from exc
            q = np.array(vals[3:])
            if not np.isfinite(vals).all() or not 0.5 < np.linalg.norm(q) < 1.5:
                raise BadInputError(f'{path}:{line}: pose is not finite or the quaternion is not unit length')
            q /= np.linalg.norm(q)
            out[row[0].strip()] = (stamp, Pose(tuple(vals[:3]), tuple(float(v) for v in q), frame_id))
    return out


def _stamp_ns(text: str) -> int:
    if text.isdigit() and int(text) > _NS_THRESHOLD:
        return int(text)
    return int(round(float(text) * 1e9))


class ImageFolderSource:
    """Frames of an image folder in file-name order (images are decoded lazily, one at a time)."""

    def __init__(self, folder: str | Path, poses_csv: str | Path | None = None, pose_frame: str = 'map') -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f'image folder {self.folder} not found')
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ConfigError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {self.folder}')
        self.poses = read_poses_csv(poses_csv, pose_frame) if poses_csv else None
        if self.poses is not None:
            missing = [p.name for p in self.files if p.name not in self.poses and p.stem not in self.poses]
            if missing:
                LOG.warning('%d of %d images have no row in %s (e.g. %s); they get no pose',
                            len(missing), len(self.files), poses_csv, missing[0])

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        for i, path in enumerate(self.files):
            stamp, pose = i * 1_000_000_000, None
            if self.poses is not None:
                stamp, pose = self.poses.get(path.name) or self.poses.get(path.stem) or (stamp, None)
            yield Frame(read_image(path), stamp, pose, path.name)


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise BadInputError(f'{path}: not a readable image')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# ----- rosbag2 -------------------------------------------------------------------------------------------
def _reader(bag: str | Path):
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore
    bag = Path(bag)
    if not bag.exists():
        raise ConfigError(f'bag {bag} not found')
    try:
        reader = AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
    except Exception as exc:   # rosbags raises several unrelated types for unreadable bags
        raise BadInputError(f'{bag}: cannot open as a rosbag2 ({exc})') from exc
    return reader


def bag_topics(bag: str | Path) -> dict[str, tuple[str, int]]:
    """topic -> (message type, message count) of a bag."""
    reader = _reader(bag)
    try:
        return {name: (t.msgtype, t.msgcount) for name, t in reader.topics.items()}
    finally:
        reader.close()


def _connections(reader, topic: str, types: tuple[str, ...], what: str, bag) -> list:
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns or conns[0].msgtype not in types:
        found = ', '.join(f'{n} ({t.msgtype})' for n, t in reader.topics.items()) or 'none'
        raise ConfigError(f'{bag}: no {what} topic {topic!r} of type {" or ".join(types)}; topics: {found}')
    return conns


def _header_ns(msg, fallback: int) -> int:
    ns = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
    return ns if ns > 0 else int(fallback)


def _pose_of(msg) -> Pose:
    pose = msg.pose.pose if hasattr(msg.pose, 'pose') else msg.pose
    p, q = pose.position, pose.orientation
    return Pose((float(p.x), float(p.y), float(p.z)), (float(q.x), float(q.y), float(q.z), float(q.w)),
                msg.header.frame_id or 'map')


def read_bag_poses(bag: str | Path, topic: str) -> Iterator[tuple[int, Pose]]:
    """(header stamp ns, Pose) of every message on a pose topic, in bag order."""
    reader = _reader(bag)
    try:
        conns = _connections(reader, topic, POSE_TYPES, 'pose', bag)
        for conn, t, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            yield _header_ns(msg, t), _pose_of(msg)
    finally:
        reader.close()


def _decode(msg, msgtype: str) -> np.ndarray:
    from fol_ros.image import decode_compressed, decode_raw
    if msgtype.endswith('CompressedImage'):
        return decode_compressed(bytes(msg.data))
    return decode_raw(bytes(msg.data), int(msg.width), int(msg.height), msg.encoding, int(msg.step))


def read_bag_images(bag: str | Path, topic: str) -> Iterator[tuple[int, np.ndarray]]:
    """(header stamp ns, RGB uint8) of every message on an Image/CompressedImage topic, in bag order."""
    for frame in read_bag_frames(bag, topic):
        yield frame.stamp_ns, frame.image


def read_bag_frames(bag: str | Path, image_topic: str, pose_topic: str = '', tolerance_s: float = 0.1
                    ) -> Iterator[Frame]:
    """Frames of an image topic, each with the pose nearest in time (None if none within `tolerance_s`)."""
    return iter(BagSource(bag, image_topic, pose_topic, tolerance_s))


class BagSource:
    """Frames of a rosbag2 image topic with poses from a pose topic (read once, up front)."""

    def __init__(self, bag: str | Path, image_topic: str, pose_topic: str = '', tolerance_s: float = 0.1) -> None:
        self.bag, self.image_topic = Path(bag), image_topic
        self.tolerance_ns = int(tolerance_s * 1e9)
        topics = bag_topics(bag)
        if image_topic not in topics or topics[image_topic][0] not in IMAGE_TYPES:
            found = ', '.join(f'{n} ({t})' for n, (t, _) in topics.items()) or 'none'
            raise ConfigError(f'{bag}: no image topic {image_topic!r} (Image or CompressedImage); topics: {found}')
        self.count = topics[image_topic][1]
        self.track = PoseTrack(read_bag_poses(bag, pose_topic)) if pose_topic else None
        if self.track is not None and not len(self.track):
            LOG.warning('%s: pose topic %s has no messages; frames get no pose', bag, pose_topic)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Frame]:
        reader = _reader(self.bag)
        try:
            conns = _connections(reader, self.image_topic, IMAGE_TYPES, 'image', self.bag)
            for i, (conn, t, raw) in enumerate(reader.messages(connections=conns)):
                msg = reader.deserialize(raw, conn.msgtype)
                stamp = _header_ns(msg, t)
                pose = self.track.nearest(stamp, self.tolerance_ns) if self.track is not None else None
                yield Frame(_decode(msg, conn.msgtype), stamp, pose, f'{self.image_topic}#{i}', msg.header.frame_id)
        finally:
            reader.close()


def write_bag(path: str | Path, images, poses=(), *, image_topic: str = '/camera/image_raw',
              pose_topic: str = '/odom', storage: str = 'mcap', compressed: bool = False,
              pose_type: str = 'odometry', camera_frame: str = 'camera', extra_poses=None) -> Path:
    """Write a rosbag2 from (stamp ns, RGB uint8) images and (stamp ns, Pose) poses, merged in time order.

    Args:
        storage: 'mcap' or 'sqlite3'. compressed: CompressedImage (JPEG) instead of raw rgb8 Image.
        pose_type: 'odometry' (nav_msgs/Odometry) or 'pose_stamped' (geometry_msgs/PoseStamped).
        extra_poses: {topic: [(stamp ns, Pose)]} more pose topics of the same type, e.g. '/ground_truth' beside a
            drifting '/odom'.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore
    if storage not in ('mcap', 'sqlite3') or pose_type not in ('odometry', 'pose_stamped'):
        raise ConfigError(f"storage={storage!r} must be 'mcap' or 'sqlite3' and pose_type={pose_type!r} "
                          "'odometry' or 'pose_stamped'")
    path, ts = Path(path), get_typestore(Stores.ROS2_HUMBLE)
    img_type = IMAGE_TYPES[1] if compressed else IMAGE_TYPES[0]
    pose_msgtype = POSE_TYPES[0] if pose_type == 'odometry' else POSE_TYPES[1]
    streams = {pose_topic: list(poses), **(extra_poses or {})}
    pending = sorted(((stamp, topic, pose) for topic, items in streams.items() for stamp, pose in items),
                     key=lambda item: item[0])
    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        img_conn = writer.add_connection(image_topic, img_type, typestore=ts)
        pose_conns = {topic: writer.add_connection(topic, pose_msgtype, typestore=ts)
                      for topic, items in streams.items() if items}

        def flush_poses(until: int) -> None:
            while pending and pending[0][0] <= until:
                stamp, topic, pose = pending.pop(0)
                writer.write(pose_conns[topic], stamp,
                             ts.serialize_cdr(_pose_msg(ts, pose_type, stamp, pose), pose_msgtype))

        for stamp, rgb in images:
            flush_poses(stamp)
            msg = _image_msg(ts, compressed, stamp, np.ascontiguousarray(rgb, np.uint8), camera_frame)
            writer.write(img_conn, stamp, ts.serialize_cdr(msg, img_type))
        flush_poses(2 ** 63 - 1)
    return path


def _header(ts, stamp: int, frame_id: str):
    time_t = ts.types['builtin_interfaces/msg/Time']
    return ts.types['std_msgs/msg/Header'](stamp=time_t(sec=stamp // 10 ** 9, nanosec=stamp % 10 ** 9),
                                           frame_id=frame_id)


def _image_msg(ts, compressed: bool, stamp: int, rgb: np.ndarray, frame_id: str):
    if compressed:
        ok, jpeg = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        return ts.types[IMAGE_TYPES[1]](header=_header(ts, stamp, frame_id), format='jpeg',
                                        data=np.frombuffer(jpeg.tobytes(), np.uint8))
    h, w = rgb.shape[:2]
    return ts.types[IMAGE_TYPES[0]](header=_header(ts, stamp, frame_id), height=h, width=w, encoding='rgb8',
                                    is_bigendian=0, step=w * 3, data=rgb.reshape(-1))


def _pose_msg(ts, pose_type: str, stamp: int, pose: Pose):
    t = ts.types
    geo = t['geometry_msgs/msg/Pose'](position=t['geometry_msgs/msg/Point'](*pose.position),
                                      orientation=t['geometry_msgs/msg/Quaternion'](*pose.orientation))
    header = _header(ts, stamp, pose.frame_id)
    if pose_type == 'pose_stamped':
        return t[POSE_TYPES[1]](header=header, pose=geo)
    cov = np.zeros(36, np.float64)
    twist = t['geometry_msgs/msg/TwistWithCovariance'](
        twist=t['geometry_msgs/msg/Twist'](linear=t['geometry_msgs/msg/Vector3'](0.0, 0.0, 0.0),
                                           angular=t['geometry_msgs/msg/Vector3'](0.0, 0.0, 0.0)), covariance=cov)
    return t[POSE_TYPES[0]](header=header, child_frame_id='base_link',
                            pose=t['geometry_msgs/msg/PoseWithCovariance'](pose=geo, covariance=cov), twist=twist)

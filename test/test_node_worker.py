"""fol_ros.ros.worker.FrameWorker without DDS: `~/reset` and `~/query` never wait for the frame in flight
(issue 16.3), and a localization map is never rewritten (issue 13.8)."""
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fol_ros.pipeline import Encoded, Result, Status
from fol_ros.records import StageTimings
from fol_ros.ros.diagnostics import NodeStats
from fol_ros.ros.params import NodeSettings
from fol_ros.ros.worker import FrameWorker
from fol_ros.verify.gate import LoopClosureGate
from fol_ros.config import GateConfig

S = 10**9


class SlowLocalizer:
    """A Localizer stand-in whose match of a streamed frame blocks until released."""

    def __init__(self, mapping: bool = False, engine: str = 'torch-cpu') -> None:
        self.encoder = SimpleNamespace(name=engine, encode=lambda images, color: [SimpleNamespace()])
        self.gate = LoopClosureGate(GateConfig())
        self.mapping = mapping
        self.place_map = SimpleNamespace(save=self._save)
        self.map_size = 3
        self.in_match = threading.Event()
        self.release = threading.Event()
        self.events: list[str] = []
        self.saved: list[str] = []

    def encode_frame(self, image, stamp_ns, encoder_lock=None):
        image()   # the worker hands over the decoding, as to the real Localizer
        return Encoded(stamp_ns, SimpleNamespace(), StageTimings(preprocess_ms=1.0, total_ms=1.0))

    def match(self, frame, pose=None, *, query_only=False):
        if not query_only:
            self.in_match.set()
            assert self.release.wait(10)
        self.events.append('query' if query_only else 'frame')
        return Result(Status.NO_MAP, timings=frame.timings)

    def reset(self) -> None:
        self.events.append('reset')

    def _save(self, path) -> None:
        self.saved.append(path)


def _image():
    from sensor_msgs.msg import Image
    rgb = np.zeros((8, 8, 3), np.uint8)
    msg = Image(height=8, width=8, encoding='rgb8', step=24, data=rgb.tobytes())
    msg.header.stamp.sec = 5
    return msg


@pytest.fixture
def worker():
    published = []
    logger = SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None,
                             error=lambda *a, **k: None)
    w = FrameWorker(logger, NodeStats(), lambda *args: published.append(args), lambda: 0)
    w.published = published
    yield w
    w.close(1.0)


def _in_flight(worker, loc):
    worker.attach(loc, NodeSettings(map_path='m', mode='mapping' if loc.mapping else 'localization'), None)
    worker.start_stream(0.0)
    worker.put(_image())
    assert loc.in_match.wait(10), 'the worker never started the frame'


@pytest.mark.parametrize('mapping', [False, True])
def test_reset_does_not_wait_for_the_frame_in_flight(worker, mapping):
    loc = SlowLocalizer(mapping=mapping)
    _in_flight(worker, loc)
    start = time.monotonic()
    ok, message = worker.reset()
    assert ok and time.monotonic() - start < 0.5 and 'next frame' in message
    assert loc.events == []
    loc.release.set()
    deadline = time.monotonic() + 10
    while len(worker.published) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loc.events == ['frame', 'reset']   # applied right after the frame in flight
    assert worker.reset() == (True, 'temporal filter, recent places and keyframe history reset')
    assert loc.events == ['frame', 'reset', 'reset']


def test_localization_query_runs_beside_the_frame_in_flight(worker):
    loc = SlowLocalizer(mapping=False)
    _in_flight(worker, loc)
    start = time.monotonic()
    result = worker.query(_image())
    assert result.status == Status.NO_MAP and time.monotonic() - start < 0.5
    assert loc.events == ['query']            # answered while the frame's match still holds the lock
    loc.release.set()


def test_save_refuses_a_localization_map_and_saves_a_session(worker):
    loc = SlowLocalizer(mapping=False)
    worker.attach(loc, NodeSettings(map_path='maps/office'), None)
    ok, message = worker.save('maps/office')
    assert not ok and 'read-only' in message and loc.saved == []
    session = SlowLocalizer(mapping=True)
    worker.attach(session, NodeSettings(map_path='maps/new', mode='mapping'), None)
    assert worker.save('maps/new') == (True, 'saved 3 places to maps/new') and session.saved == ['maps/new']


def test_close_ends_the_thread(worker):
    assert worker.close(2.0)


def test_published_timings_are_the_pipeline_s_own(worker):
    """The worker publishes the stage times as the pipeline measured them (decoding included) and keeps the wait in
    the slot apart, as queue_ms on /diagnostics: total_ms has one meaning."""
    loc = SlowLocalizer()
    loc.release.set()
    worker.attach(loc, NodeSettings(map_path='m'), None)
    worker.start_stream(0.0)
    worker.put(_image())
    deadline = time.monotonic() + 10
    while worker.stats.processed < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    _, result, stamp_ns = worker.published[0]
    assert stamp_ns == 5 * S and result.timings == StageTimings(preprocess_ms=1.0, total_ms=1.0)
    assert worker.stats.percentiles('total_ms', (50,)) == [1.0]
    assert worker.stats.percentiles('queue_ms', (50,))[0] >= 0.0


def test_tf_pose_source_looks_up_the_camera_frame_at_the_frame_stamp():
    """fol_ros.ros.poses.TfPoses against a recording buffer (issue 13.12)."""
    from geometry_msgs.msg import TransformStamped

    from fol_ros.ros.poses import TfPoses

    class RecordingBuffer:
        def __init__(self):
            self.calls = []

        def lookup_transform(self, target, source, stamp, timeout):
            self.calls.append((target, source, stamp.nanoseconds, timeout.nanoseconds))
            if source == 'lost':
                raise RuntimeError('frame "lost" does not exist')
            t = TransformStamped(child_frame_id=source)
            t.header.frame_id = target
            t.transform.translation.x, t.transform.rotation.z, t.transform.rotation.w = 3.0, 1.0, 0.0
            return t

    buffer = RecordingBuffer()
    poses = TfPoses(buffer, 'map', camera_frame='', timeout_s=0.25)
    pose = poses.pose_at(7 * S + 5, 'cam_optical')
    assert buffer.calls == [('map', 'cam_optical', 7 * S + 5, 250_000_000)]
    assert pose.position == (3.0, 0.0, 0.0) and pose.orientation == (0.0, 0.0, 1.0, 0.0) and pose.frame_id == 'map'
    assert TfPoses(buffer, 'odom', camera_frame='base_camera').pose_at(S, 'ignored').frame_id == 'odom'
    assert buffer.calls[-1][:2] == ('odom', 'base_camera')
    assert poses.pose_at(S, 'lost') is None and 'no TF map <- lost' in poses.last_miss
    assert 'does not exist' in poses.last_miss
    assert poses.pose_at(S, '') is None and 'set camera_frame' in poses.last_miss


def test_pose_source_settings_are_checked():
    from fol_ros.errors import ConfigError
    with pytest.raises(ConfigError, match='pose_source tf and odom_topic'):
        NodeSettings(mode='mapping', pose_source='tf', odom_topic='odom')
    with pytest.raises(ConfigError, match='pose_source'):
        NodeSettings(mode='mapping', pose_source='gps')


def test_without_tf2_ros_pose_source_tf_names_the_fix():
    from fol_ros.errors import ConfigError
    from fol_ros.ros.poses import tf_listener
    try:
        import tf2_ros  # noqa: F401
        pytest.skip('tf2_ros is installed here')
    except ImportError:
        pass
    with pytest.raises(ConfigError, match='pose_source tf needs tf2_ros.*odom_topic'):
        tf_listener(None)

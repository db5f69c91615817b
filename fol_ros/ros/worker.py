"""The node's frame worker: runs the pipeline on the newest camera frame in a thread of its own.

Locking (issue 16.3: services must not wait for the frame in flight):
- decoding and encoding run outside the pipeline lock (concurrently for torch and ONNX Runtime; TensorRT
  execution contexts are not re-entrant, so other engines encode one frame at a time);
- matching, the gate and the keyframe decision run under the pipeline lock;
- `~/query` in localization mode takes no lock at all: the map never changes there, and the query runs on a view
  of the Localizer with a snapshot of the gate taken after each frame. In mapping mode (the map grows) it waits
  for the match of the frame in flight, never for its encode;
- `~/reset` never waits: it is applied at once, or right after the match in flight if that holds the lock;
- a save waits only for the match in flight.
Every stage time, decoding included, is measured by the pipeline (`Localizer.encode_frame` / `match`) and published
as it returns: `latency.total_ms` is the sum of the stages. The wait in the frame slot before processing is not a
stage; /diagnostics shows it apart as `queue_ms`.
The thread is a daemon: a frame in flight never holds up the process's exit.
"""
from __future__ import annotations

import copy
import contextlib
import threading
import time
from typing import Callable

from fol_ros.errors import FolError
from fol_ros.pipeline import Encoded, Localizer, Result, Status
from fol_ros.records import StageTimings
from fol_ros.ros import convert
from fol_ros.ros.diagnostics import NodeStats
from fol_ros.ros.poses import OdometryPoses
from fol_ros.ros.slot import FrameSlot


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class FrameWorker:
    """Pipeline owner of the node.

    Args:
        logger: the node's rclpy logger.
        stats: counters shown on /diagnostics.
        publish: called under the pipeline lock for each processed frame while active:
            publish(msg, result, stamp_ns).
        now_ns: the node's clock, for frames without a stamp.
    """

    def __init__(self, logger, stats: NodeStats, publish: Callable, now_ns: Callable[[], int]) -> None:
        self.logger, self.stats, self._publish, self._now_ns = logger, stats, publish, now_ns
        self.slot = FrameSlot()
        self.localizer: Localizer | None = None
        self.settings = None
        self.bridge = None
        self.active = False
        self.poses = OdometryPoses()   # or a TfPoses (pose_source tf), set by attach
        self._encode_lock = threading.Lock()
        self._pipeline_lock = threading.Lock()
        self._reset_pending = False
        self._query_gate = None
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name='fol_ros_frame_worker', daemon=True)
        self._thread.start()

    # set-up -------------------------------------------------------------------------------------------------
    def attach(self, localizer: Localizer, settings, bridge, poses=None) -> None:
        with self._pipeline_lock:
            self.localizer, self.settings, self.bridge = localizer, settings, bridge
            self.poses = poses if poses is not None else OdometryPoses()
            self._reset_pending = False
            self._query_gate = copy.deepcopy(localizer.gate)

    def apply_live(self, settings, config) -> None:
        """Take changed live settings (`ros2 param set`) from the next frame on; no lock: each swap is atomic."""
        loc = self.localizer
        if loc is not None:
            loc.update_config(config)
            if self._query_gate is not None:
                self._query_gate.config = loc.gate.config
        self.settings = settings
        if hasattr(self.poses, 'map_frame'):
            self.poses.map_frame = settings.map_frame
        self.slot.set_rate(settings.max_rate_hz)

    def detach(self) -> None:
        """Stop the stream and drop the model and the map (a frame in flight finishes unpublished)."""
        self.stop_stream()
        with self._pipeline_lock:
            self.localizer = None

    def start_stream(self, max_rate_hz: float) -> None:
        self.slot.clear()
        self.slot.set_rate(max_rate_hz)
        self.active = True

    def stop_stream(self) -> None:
        self.active = False
        self.slot.clear()

    def close(self, timeout: float = 0.0) -> bool:
        """End the thread; True if no frame is still being computed after `timeout` seconds."""
        self.stop_stream()
        self.slot.close()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return self._busy

    # input --------------------------------------------------------------------------------------------------
    def put(self, msg) -> bool:
        return self.slot.put((msg, time.perf_counter()))

    def add_odometry(self, stamp_ns: int, pose) -> None:
        add = getattr(self.poses, 'add', None)
        if add is not None:
            add(stamp_ns, pose)

    def pose_at(self, stamp_ns: int, frame_id: str = ''):
        """The camera pose of a frame from the pose source (odometry nearest in time, or TF at the stamp); None
        without one. A miss while a pose source is configured counts on /diagnostics and is logged (throttled)."""
        pose = self.poses.pose_at(stamp_ns, frame_id)
        s = self.settings
        if pose is None and s is not None and (s.pose_source == 'tf' or s.odom_topic):
            self.stats.on_pose_missing(self.poses.last_miss)
            self.logger.warning(f'frame without a camera pose: {self.poses.last_miss}',
                                throttle_duration_sec=s.bad_input_log_period_s)
        return pose

    def _loop(self) -> None:
        while not self.slot.closed:
            if not self.slot.wait(0.5):
                continue
            if not self.active:
                self.slot.clear()
                continue
            item = self.slot.take()
            if item is None:
                continue
            self._busy = True
            try:
                self._process(*item)
            except Exception as exc:  # the worker must outlive any one frame
                self.logger.error(f'frame worker: {type(exc).__name__}: {exc}')
            finally:
                self._busy = False

    # pipeline -----------------------------------------------------------------------------------------------
    def _prepare(self, loc: Localizer, msg) -> Encoded:
        """Stages 1-2 (decode, check, encode) outside the pipeline lock, timed by the pipeline."""
        stamp_ns = convert.to_ns(msg.header.stamp) or self._now_ns()
        try:
            return loc.encode_frame(lambda: convert.image_to_rgb(msg, self.settings.max_image_pixels, self.bridge),
                                    stamp_ns, encoder_lock=self._encoder_guard(loc))
        except Exception as exc:  # any failure of one frame must not stop the stream
            return Encoded(stamp_ns, None, StageTimings(),
                           Result(Status.ERROR, message=f'{type(exc).__name__}: {exc}'))

    def _match(self, loc: Localizer, frame: Encoded, query: bool, pose=None) -> Result:
        """Stages 3-6 under the pipeline lock (a reset asked for meanwhile is applied first)."""
        self._apply_pending_reset(loc)
        try:
            return loc.match(frame, None if query else pose, query_only=query)
        except Exception as exc:
            return Result(Status.ERROR, message=f'{type(exc).__name__}: {exc}')
        finally:
            if not query:
                self._query_gate = copy.deepcopy(loc.gate)

    def _encoder_guard(self, loc: Localizer):
        """The encoder lock, except for engines whose inference may run in several threads at once."""
        name = getattr(loc.encoder, 'name', '')
        if name.startswith(('torch', 'onnxruntime')):
            return contextlib.nullcontext()
        return self._encode_lock

    def _report(self, result: Result) -> None:
        if result.status not in (Status.BAD_INPUT, Status.ERROR):
            return
        bad = result.status == Status.BAD_INPUT
        self.stats.on_problem(bad, result.message)
        log = self.logger.warning if bad else self.logger.error
        log(f'{"bad input" if bad else "processing error"}: {result.message}',
            throttle_duration_sec=self.settings.bad_input_log_period_s)

    def _process(self, msg, received: float) -> None:
        loc = self.localizer
        if loc is None:
            return
        queue_ms = _ms(received)
        frame = self._prepare(loc, msg)
        # before the pipeline lock: a TF lookup may wait up to tf_timeout_s for the transform to arrive
        pose = None if frame.failure else self.pose_at(frame.stamp_ns, msg.header.frame_id)
        with self._pipeline_lock:
            if self.localizer is not loc or not self.active:
                return
            result = frame.failure or self._match(loc, frame, query=False, pose=pose)
            self._apply_pending_reset(loc)
            self._report(result)
            self._publish(msg, result, frame.stamp_ns)
        stages = {k: getattr(result.timings, k) for k in ('preprocess_ms', 'encode_ms', 'search_ms',
                                                            'rerank_ms', 'verify_ms', 'total_ms')}
        stages['queue_ms'] = queue_ms
        decision = result.loop_closure
        self.stats.on_processed(stages, bool(decision is not None and decision.accepted))

    def query(self, msg) -> Result | None:
        """One image answered without changing state, or None when not configured."""
        loc = self.localizer
        if loc is None:
            return None
        frame = self._prepare(loc, msg)
        result = frame.failure
        if result is None and not loc.mapping:   # the map never changes: no lock, a snapshot of the gate
            view = copy.copy(loc)
            view.gate = self._query_gate
            try:
                result = view.match(frame, None, query_only=True)
            except Exception as exc:
                result = Result(Status.ERROR, message=f'{type(exc).__name__}: {exc}')
        elif result is None:
            with self._pipeline_lock:
                if self.localizer is not loc:
                    return None
                result = self._match(loc, frame, query=True)
        self._report(result)
        return result

    # services -----------------------------------------------------------------------------------------------
    def reset(self) -> tuple[bool, str]:
        """Forget the temporal filter, recent places and keyframe history, without waiting for the frame in flight."""
        if self.localizer is None:
            return False, 'the node is not configured'
        self.slot.clear()
        self._reset_pending = True
        if self._pipeline_lock.acquire(blocking=False):
            try:
                if self.localizer is not None:
                    self._apply_pending_reset(self.localizer)
            finally:
                self._pipeline_lock.release()
            return True, 'temporal filter, recent places and keyframe history reset'
        return True, ('temporal filter, recent places and keyframe history reset from the next frame on '
                      '(the frame in flight finishes with the old history)')

    def _apply_pending_reset(self, loc: Localizer) -> None:
        if self._reset_pending:
            self._reset_pending = False
            loc.reset()
            self._query_gate = copy.deepcopy(loc.gate)

    def save(self, path: str) -> tuple[bool, str]:
        """Write the session's map to `path` (mapping mode only: a localization map is read-only)."""
        with self._pipeline_lock:
            loc = self.localizer
            if loc is None or loc.place_map is None:
                return False, 'no map to save (the node is not configured)'
            if not loc.mapping:
                return False, (f'mode localization: the map {path!r} is read-only and is not rewritten; '
                               'run in mode mapping to grow a map and save it')
            if not path:
                return False, 'map_path is empty: set the map_path parameter to where the map should be saved'
            try:
                loc.place_map.save(path)
            except (FolError, OSError) as exc:
                self.logger.error(f'save_map failed: {exc}')
                return False, f'saving to {path} failed: {exc}'
            size = loc.map_size
        self.logger.info(f'map saved to {path} ({size} places)')
        return True, f'saved {size} places to {path}'

"""`place_recognition_node`: a lifecycle node around `pipeline.Localizer`.

configure loads the model and the map (FAILURE, not a crash, when either is missing or broken) and creates the
publishers and services; activate subscribes to the camera (and odometry); deactivate unsubscribes; cleanup
releases the model and the map. Frames go into a one-frame slot (the newest wins, replaced frames count as dropped)
that a worker drains in its own callback group, at most max_rate_hz times a second, so services and diagnostics
stay responsive on the MultiThreadedExecutor and no backlog builds up.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import rclpy
import rclpy.logging
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

from fol_ros.errors import BadInputError, FolError
from fol_ros.msg import LoopClosure, PlaceRecognition
from fol_ros.pipeline import Localizer, Result, Status
from fol_ros.ros import convert
from fol_ros.ros.diagnostics import NodeStats, diagnostic_array
from fol_ros.ros.params import declare_all, read_all
from fol_ros.ros.resources import RclpyLogHandler, load_localizer, map_id as make_map_id
from fol_ros.ros.slot import FrameSlot
from fol_ros.srv import QueryImage

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class PlaceRecognitionNode(LifecycleNode):
    """FoL place recognition and loop closure on a camera stream (parameters: config/fol_ros.yaml)."""

    def __init__(self, node_name: str = 'place_recognition_node', **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        declare_all(self)
        self.stats = NodeStats()
        self.localizer: Localizer | None = None
        self.settings = None
        self.map_id = ''
        self._bridge = None
        self._slot = FrameSlot()
        self._pipeline_lock = threading.Lock()
        self._seq = 0
        self._odometry: deque = deque(maxlen=400)
        self._active = False
        self._subs: list = []
        self._pubs: dict = {}
        self._srvs: list = []
        self._input_group = MutuallyExclusiveCallbackGroup()
        self._worker_group = MutuallyExclusiveCallbackGroup()
        self._service_group = MutuallyExclusiveCallbackGroup()
        self._state_label = 'unconfigured'
        self._wake = self.create_guard_condition(self._drain, callback_group=self._worker_group)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        period = float(self.get_parameter('diagnostics_period_s').value)
        self.create_timer(period, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        if self.get_parameter('autostart').value:
            if self.trigger_configure() == SUCCESS:
                self.trigger_activate()

    # lifecycle ------------------------------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Load model and map, create publishers and services. FAILURE (logged) on any bad setting or file."""
        try:
            self.settings, config = read_all(self)
            self.localizer = load_localizer(self.settings, config, self.get_logger())
        except FolError as exc:
            self.get_logger().error(f'configure failed: {exc}')
            self.stats.on_problem(False, f'configure failed: {exc}')
            return FAILURE
        except Exception as exc:  # a crash here must stay a failed transition, never kill the node
            self.get_logger().error(f'configure failed unexpectedly: {type(exc).__name__}: {exc}')
            self.stats.on_problem(False, f'configure failed: {exc}')
            return FAILURE
        self.map_id = make_map_id(self.localizer, self.settings.map_path)
        self._bridge = convert.load_cv_bridge() if self.settings.use_cv_bridge else None
        self._pubs = {'result': self.create_lifecycle_publisher(PlaceRecognition, 'place_recognition', 10),
                      'loop': self.create_lifecycle_publisher(LoopClosure, 'loop_closure', 10)}
        if self.settings.publish_pose:
            self._pubs['pose'] = self.create_lifecycle_publisher(PoseWithCovarianceStamped, 'matched_pose', 10)
        if self.settings.publish_time_pair:
            self._pubs['times'] = self.create_lifecycle_publisher(Float64MultiArray, 'loop_closure_times', 10)
        group = self._service_group
        self._srvs = [self.create_service(Trigger, '~/save_map', self._on_save_map, callback_group=group),
                      self.create_service(QueryImage, '~/query', self._on_query, callback_group=group),
                      self.create_service(Trigger, '~/reset', self._on_reset, callback_group=group)]
        enc = self.localizer.encoder
        self.get_logger().info(f'configured: mode {self.settings.mode}, map {self.map_id or "(none)"} with '
                               f'{self.localizer.map_size} places, model {enc.info.fingerprint}, engine {enc.name}')
        self._state_label = 'inactive'
        return SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Subscribe to the camera (and odometry) with sensor-data QoS."""
        s = self.settings
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=s.qos_depth,
                         reliability=ReliabilityPolicy.BEST_EFFORT if s.qos_reliability == 'best_effort'
                         else ReliabilityPolicy.RELIABLE)
        kind = CompressedImage if s.compressed else Image
        self._subs = [self.create_subscription(kind, s.image_topic, self._on_image, qos,
                                               callback_group=self._input_group)]
        if s.odom_topic:
            from nav_msgs.msg import Odometry
            self._subs.append(self.create_subscription(Odometry, s.odom_topic, self._on_odometry, 50,
                                                       callback_group=self._input_group))
        self.stats.reset()
        self._seq = 0
        self._slot = FrameSlot(s.max_rate_hz)
        self._active = True
        self._state_label = 'active'
        self.get_logger().info(f'active: {kind.__name__} on {self.resolve_topic_name(s.image_topic)}')
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """Unsubscribe; a frame being processed finishes but is not published."""
        self._active = False
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        self._slot.clear()
        self._state_label = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        """Release model, map, publishers and services (saving the map first if save_map_on_cleanup)."""
        if self.settings is not None and self.settings.save_map_on_cleanup:
            self._save_map()
        self._release()
        return SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        """Stop everything from any state."""
        self._active = False
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        self._release()
        return SUCCESS

    def stop_processing(self) -> None:
        """Stop taking frames (before the executor shuts down); a frame in flight finishes unpublished."""
        self._active = False
        self._slot.clear()

    def _release(self) -> None:
        with self._pipeline_lock:
            self.localizer = None
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        for srv in self._srvs:
            self.destroy_service(srv)
        self._pubs, self._srvs, self.map_id = {}, [], ''
        self._state_label = 'unconfigured'

    # input --------------------------------------------------------------------------------------------------
    def _on_image(self, msg) -> None:
        self.stats.on_received(self._slot.put((msg, time.perf_counter())))
        self._wake.trigger()

    def _on_odometry(self, msg) -> None:
        self._odometry.append((convert.to_ns(msg.header.stamp), convert.pose_from_odometry(msg)))

    def _pose_at(self, stamp_ns: int):
        """The odometry pose nearest in time to a frame (None without odometry)."""
        poses = list(self._odometry)
        if not poses:
            return None
        return min(poses, key=lambda item: abs(item[0] - stamp_ns))[1]

    def _drain(self) -> None:
        """Worker: process the newest frame until the slot is empty, never faster than max_rate_hz."""
        while self._active:
            item = self._slot.take()
            if item is None:
                return
            self._process(*item)

    def _process(self, msg, received: float) -> None:
        with self._pipeline_lock:
            if self.localizer is None:
                return
            result, stamp_ns = self._run(msg, query=False)
            if not self._active:
                return
            header = msg.header
            seq, self._seq = self._seq, self._seq + 1
            total_ms = (time.perf_counter() - received) * 1000.0
            self._pubs['result'].publish(convert.result_to_msg(result, header, seq, self.map_id, total_ms,
                                                               self.settings.max_candidates))
            decision = result.loop_closure
            if decision is not None and decision.accepted:
                self._publish_loop_closure(result, header, stamp_ns)
        stages = {k: getattr(result.timings, k) for k in ('preprocess_ms', 'encode_ms', 'search_ms',
                                                            'rerank_ms', 'verify_ms')}
        stages['total_ms'] = total_ms
        self.stats.on_processed(stages, bool(decision is not None and decision.accepted))

    def _run(self, msg, query: bool) -> tuple[Result, int]:
        """Convert and run one image message; every failure becomes a status (logged, throttled, counted)."""
        stamp_ns = convert.to_ns(msg.header.stamp) or self.get_clock().now().nanoseconds
        start = time.perf_counter()
        try:
            image = convert.image_to_rgb(msg, self.settings.max_image_pixels, self._bridge)
            decode_ms = (time.perf_counter() - start) * 1000.0
            if query:
                result = self.localizer.query(image, stamp_ns)
            else:
                result = self.localizer.process(image, stamp_ns, self._pose_at(stamp_ns))
            result.timings.preprocess_ms += decode_ms
            result.timings.total_ms += decode_ms
        except BadInputError as exc:
            result = Result(Status.BAD_INPUT, message=str(exc))
            result.timings.preprocess_ms = result.timings.total_ms = (time.perf_counter() - start) * 1000.0
        except Exception as exc:  # any failure of one frame must not stop the stream
            result = Result(Status.ERROR, message=f'{type(exc).__name__}: {exc}')
        if result.status in (Status.BAD_INPUT, Status.ERROR):
            bad = result.status == Status.BAD_INPUT
            self.stats.on_problem(bad, result.message)
            log = self.get_logger().warning if bad else self.get_logger().error
            log(f'{"bad input" if bad else "processing error"}: {result.message}',
                throttle_duration_sec=self.settings.bad_input_log_period_s)
        return result, stamp_ns

    def _publish_loop_closure(self, result: Result, header, stamp_ns: int) -> None:
        decision = result.loop_closure
        self._pubs['loop'].publish(convert.loop_closure_to_msg(result, decision, header, self.map_id))
        cand = decision.candidate
        if 'pose' in self._pubs and cand.pose is not None:
            self._pubs['pose'].publish(convert.matched_pose_msg(cand, header, self.settings.pose_covariance,
                                                                self.settings.map_frame))
        if 'times' in self._pubs:
            self._pubs['times'].publish(convert.time_pair_msg(stamp_ns, cand.stamp_ns))

    # services and diagnostics -------------------------------------------------------------------------------
    def _on_query(self, request, response):
        msg = request.compressed_image if len(request.compressed_image.data) else request.image
        with self._pipeline_lock:
            if self.localizer is None:
                response.result = PlaceRecognition(status=int(Status.NO_MAP), header=msg.header,
                                                   status_message='the node is not configured', added_place_id=-1)
                return response
            start = time.perf_counter()
            result, _ = self._run(msg, query=True)
            total_ms = (time.perf_counter() - start) * 1000.0
            response.result = convert.result_to_msg(result, msg.header, 0, self.map_id, total_ms,
                                                    self.settings.max_candidates)
        return response

    def _on_save_map(self, request, response):
        response.success, response.message = self._save_map()
        return response

    def _save_map(self) -> tuple[bool, str]:
        with self._pipeline_lock:
            if self.localizer is None or self.localizer.place_map is None:
                return False, 'no map to save (the node is not configured)'
            path = self.settings.map_path
            if not path:
                return False, 'map_path is empty: set the map_path parameter to where the map should be saved'
            try:
                self.localizer.place_map.save(path)
            except (FolError, OSError) as exc:
                self.get_logger().error(f'save_map failed: {exc}')
                return False, f'saving to {path} failed: {exc}'
            size = self.localizer.map_size
        self.get_logger().info(f'map saved to {path} ({size} places)')
        return True, f'saved {size} places to {path}'

    def _on_reset(self, request, response):
        with self._pipeline_lock:
            if self.localizer is None:
                response.success, response.message = False, 'the node is not configured'
                return response
            self.localizer.reset()
        self._slot.clear()
        response.success, response.message = True, 'temporal filter, recent places and keyframe history reset'
        return response

    def _publish_diagnostics(self) -> None:
        loc = self.localizer
        state = self._state_label
        extra = {'map_id': self.map_id, 'map_size': str(loc.map_size if loc else 0),
                 'model': loc.encoder.info.fingerprint if loc else '', 'model_label': loc.encoder.info.label
                 if loc else '', 'engine': loc.encoder.name if loc else '',
                 'mode': self.settings.mode if self.settings else ''}
        self._diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(), self.get_name(), self.stats,
                                                state, extra))


def main(args: list[str] | None = None) -> int:
    """Console script `fol-ros-node`: run the node on a MultiThreadedExecutor.

    `fol-ros-node --params-file config/fol_ros.yaml` equals `--ros-args --params-file ...`; any other
    `--ros-args` are passed through to rclpy.
    """
    import sys
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
    argv = list(sys.argv if args is None else ['fol-ros-node', *args])
    end = argv.index('--ros-args') if '--ros-args' in argv else len(argv)
    if '--params-file' in argv[:end]:
        i = argv.index('--params-file')
        path = argv[i + 1] if i + 1 < end else ''
        # the file goes first: -p overrides given after --ros-args must win over it
        argv = [*argv[:i], *argv[i + 2:end], '--ros-args', '--params-file', path, '--', *argv[end:]]
    # our own SIGINT handling: stop the worker, then the executor, then the context (never publish on a dead one)
    try:
        from rclpy.signals import SignalHandlerOptions
    except ImportError:  # an rclpy without the option installs its handler; shutdown then races the worker
        rclpy.init(args=argv)
    else:
        rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    root = logging.getLogger('fol_ros')
    root.setLevel(logging.INFO)
    root.addHandler(RclpyLogHandler(rclpy.logging.get_logger('fol_ros')))
    node = None
    executor = MultiThreadedExecutor(num_threads=4)
    try:
        node = PlaceRecognitionNode()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop_processing()
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

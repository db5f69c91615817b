"""`place_recognition_node`: a lifecycle node around `pipeline.Localizer` (lifecycle, topics, services).

configure loads the model and the map (FAILURE, not a crash, when either is missing or broken) and creates the
publishers and services; activate subscribes to the camera (and odometry); deactivate unsubscribes; cleanup
releases the model and the map. Frames go into a one-frame slot (the newest wins, replaced frames count as dropped)
that `worker.FrameWorker` drains in a thread of its own, at most max_rate_hz times a second, so services and
diagnostics stay responsive and no backlog builds up. The process around it (signals, spinning): `ros.run`.

Subscriptions and publishers are created without QoS event handlers: rclpy's executor crashes with InvalidHandle
when an event handler is destroyed (deactivate, cleanup) while another thread builds its wait set (issue 16.1).
A QoS mismatch on the camera topic is reported by the diagnostics timer instead.
"""
from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

from fol_ros.errors import FolError
from fol_ros.msg import LoopClosure, PlaceRecognition
from fol_ros.pipeline import Result, Status
from fol_ros.ros import convert
from fol_ros.ros.diagnostics import NodeStats, diagnostic_array
from fol_ros.ros.params import check_change, declare_all, read_all
from fol_ros.ros.poses import OdometryPoses, TfPoses, tf_listener
from fol_ros.ros.resources import load_localizer, map_id as make_map_id
from fol_ros.ros.worker import FrameWorker
from fol_ros.srv import QueryImage

try:  # Iron and newer
    from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import PublisherEventCallbacks, SubscriptionEventCallbacks

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class PlaceRecognitionNode(LifecycleNode):
    """FoL place recognition and loop closure on a camera stream (parameters: config/fol_ros.yaml)."""

    def __init__(self, node_name: str = 'place_recognition_node', **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        declare_all(self)
        # after the declarations: a bad value in the params file fails configure with a message, not __init__
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.stats = NodeStats()
        self.settings = None
        self.map_id = ''
        self._seq = 0
        self._subs: list = []
        self._pubs: dict = {}
        self._srvs: list = []
        self._input_group = MutuallyExclusiveCallbackGroup()
        self._service_group = MutuallyExclusiveCallbackGroup()
        self._state_label = 'unconfigured'
        self._qos_warned = False
        self._tf = None   # (tf2_ros Buffer, TransformListener), made at the first configure with pose_source tf
        self.worker = FrameWorker(self.get_logger(), self.stats, self._publish_result,
                                  lambda: self.get_clock().now().nanoseconds)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        period = float(self.get_parameter('diagnostics_period_s').value)
        # a steady clock: /diagnostics keeps coming with use_sim_time when /clock stops (or never starts)
        self.create_timer(period, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup(),
                          clock=Clock(clock_type=ClockType.STEADY_TIME))
        if self.get_parameter('autostart').value:
            if self.trigger_configure() == SUCCESS:
                self.trigger_activate()

    @property
    def localizer(self):
        return self.worker.localizer

    # lifecycle ------------------------------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Load model and map, create publishers and services. FAILURE (logged) on any bad setting or file."""
        try:
            self.settings, config = read_all(self)
            poses = self._pose_source(self.settings)
            localizer = load_localizer(self.settings, config, self.get_logger())
        except FolError as exc:
            self.get_logger().error(f'configure failed: {exc}')
            self.stats.on_problem(False, f'configure failed: {exc}')
            return FAILURE
        except Exception as exc:  # a crash here must stay a failed transition, never kill the node
            self.get_logger().error(f'configure failed unexpectedly: {type(exc).__name__}: {exc}')
            self.stats.on_problem(False, f'configure failed: {exc}')
            return FAILURE
        self.map_id = make_map_id(localizer, self.settings.map_path)
        bridge = convert.load_cv_bridge() if self.settings.use_cv_bridge else None
        self.worker.attach(localizer, self.settings, bridge, poses)
        pub = self._publisher
        self._pubs = {'result': pub(PlaceRecognition, 'place_recognition'), 'loop': pub(LoopClosure, 'loop_closure')}
        if self.settings.publish_pose:
            self._pubs['pose'] = pub(PoseWithCovarianceStamped, 'matched_pose')
        if self.settings.publish_time_pair:
            self._pubs['times'] = pub(Float64MultiArray, 'loop_closure_times')
        group = self._service_group
        self._srvs = [self.create_service(Trigger, '~/save_map', self._on_save_map, callback_group=group),
                      self.create_service(QueryImage, '~/query', self._on_query, callback_group=group),
                      self.create_service(Trigger, '~/reset', self._on_reset, callback_group=group)]
        (self.get_logger().warning if localizer.gate_fallback else self.get_logger().info)(localizer.gate_note)
        enc = localizer.encoder
        self.get_logger().info(f'configured: mode {self.settings.mode}, map {self.map_id or "(none)"} with '
                               f'{localizer.map_size} places, model {enc.info.fingerprint}, engine {enc.name}')
        self._state_label = 'inactive'
        return SUCCESS

    def _pose_source(self, s):
        """The camera pose source of the settings (odometry is subscribed on activate)."""
        if s.pose_source != 'tf':
            return OdometryPoses()
        if self._tf is None:
            self._tf = tf_listener(self)
        return TfPoses(self._tf[0], s.map_frame, s.camera_frame, s.tf_timeout_s)

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """Refuse wrong types, out-of-range values and (while configured) settings read at configure, with the
        reason; apply live settings at once."""
        configured = self.localizer is not None
        for p in parameters:
            reason = check_change(p.name, p.value, configured)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        if configured:
            try:
                settings, config = read_all(self, {p.name: p.value for p in parameters})
            except FolError as exc:   # e.g. verify.method essential without intrinsics
                return SetParametersResult(successful=False, reason=str(exc))
            self.worker.apply_live(settings, config)
            self.settings = settings
            self.get_logger().info('live settings changed: ' + ', '.join(f'{p.name}={p.value}' for p in parameters))
        return SetParametersResult(successful=True)

    def _publisher(self, kind, topic: str):
        return self.create_lifecycle_publisher(kind, topic, 10,
                                               event_callbacks=PublisherEventCallbacks(use_default_callbacks=False))

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Subscribe to the camera (and odometry) with sensor-data QoS."""
        s = self.settings
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=s.qos_depth,
                         reliability=ReliabilityPolicy.BEST_EFFORT if s.qos_reliability == 'best_effort'
                         else ReliabilityPolicy.RELIABLE)
        kind = CompressedImage if s.compressed else Image
        no_events = SubscriptionEventCallbacks(use_default_callbacks=False)
        self._subs = [self.create_subscription(kind, s.image_topic, self._on_image, qos, event_callbacks=no_events,
                                               callback_group=self._input_group)]
        if s.odom_topic:
            from nav_msgs.msg import Odometry
            self._subs.append(self.create_subscription(Odometry, s.odom_topic, self._on_odometry, 50,
                                                       event_callbacks=no_events,
                                                       callback_group=self._input_group))
        self.stats.reset()
        self._seq = 0
        self._qos_warned = False
        self.worker.start_stream(s.max_rate_hz)
        self._state_label = 'active'
        self.get_logger().info(f'active: {kind.__name__} on {self.resolve_topic_name(s.image_topic)}')
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """Unsubscribe; a frame being processed finishes but is not published."""
        self._unsubscribe()
        self._state_label = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        """Release model, map, publishers and services (saving a mapping session first if save_map_on_cleanup)."""
        self._save_on_exit()
        self._release()
        return SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        """Stop everything from any state (a mapping session is saved first if save_map_on_cleanup)."""
        self._unsubscribe()
        self._save_on_exit()
        self._release()
        return SUCCESS

    def stop_processing(self) -> None:
        """Stop taking frames (before the executor shuts down); a frame in flight finishes unpublished."""
        self.worker.stop_stream()

    def _unsubscribe(self) -> None:
        self.worker.stop_stream()
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []

    def _save_on_exit(self) -> None:
        s, loc = self.settings, self.localizer
        if s is not None and s.save_map_on_cleanup and loc is not None and loc.mapping:
            ok, message = self.worker.save(s.map_path)
            if not ok:
                self.get_logger().error(f'the mapping session was NOT saved: {message}')

    def _release(self) -> None:
        self.worker.detach()
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        for srv in self._srvs:
            self.destroy_service(srv)
        self._pubs, self._srvs, self.map_id = {}, [], ''
        self._state_label = 'unconfigured'

    # input and output ---------------------------------------------------------------------------------------
    def _on_image(self, msg) -> None:
        if self.worker.active:
            self.stats.on_received(self.worker.put(msg))

    def _on_odometry(self, msg) -> None:
        self.worker.add_odometry(convert.to_ns(msg.header.stamp), convert.pose_from_odometry(msg))

    def _publish_result(self, msg, result: Result, stamp_ns: int) -> None:
        """Called by the worker (under its pipeline lock) for each processed frame."""
        header, s = msg.header, self.settings
        seq, self._seq = self._seq, self._seq + 1
        self._pubs['result'].publish(convert.result_to_msg(result, header, seq, self.map_id, s.max_candidates))
        decision = result.loop_closure
        if decision is None or not decision.accepted:
            return
        self._pubs['loop'].publish(convert.loop_closure_to_msg(result, decision, header, self.map_id))
        cand = decision.candidate
        if 'pose' in self._pubs and cand.pose is not None:
            self._pubs['pose'].publish(convert.matched_pose_msg(cand, header, s.pose_covariance, s.map_frame))
        if 'times' in self._pubs:
            self._pubs['times'].publish(convert.time_pair_msg(stamp_ns, cand.stamp_ns))

    # services and diagnostics -------------------------------------------------------------------------------
    def _on_query(self, request, response):
        msg = request.compressed_image if len(request.compressed_image.data) else request.image
        result = self.worker.query(msg)
        if result is None:
            response.result = PlaceRecognition(status=int(Status.NO_MAP), header=msg.header,
                                               status_message='the node is not configured', added_place_id=-1)
            return response
        response.result = convert.result_to_msg(result, msg.header, 0, self.map_id, self.settings.max_candidates)
        return response

    def _on_save_map(self, request, response):
        path = self.settings.map_path if self.settings is not None else ''
        response.success, response.message = self.worker.save(path)
        if not response.success:
            self.get_logger().warning(f'save_map refused: {response.message}')
        return response

    def _on_reset(self, request, response):
        response.success, response.message = self.worker.reset()
        return response

    def _check_camera_qos(self) -> None:
        """Warn once per activation when a camera publisher cannot reach a reliable subscription."""
        s = self.settings
        if self._qos_warned or not self._subs or s is None or s.qos_reliability != 'reliable':
            return
        topic = self.resolve_topic_name(s.image_topic)
        if any(info.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
               for info in self.get_publishers_info_by_topic(topic)):
            self._qos_warned = True
            text = (f'a best-effort publisher on {topic} cannot reach this reliable subscription: '
                    'set qos_reliability best_effort')
            self.get_logger().warning(text)
            self.stats.on_problem(False, text)

    def _publish_diagnostics(self) -> None:
        self._check_camera_qos()
        loc, s = self.localizer, self.settings
        extra = {'map_id': self.map_id, 'map_size': str(loc.map_size if loc else 0),
                 'model': loc.encoder.info.fingerprint if loc else '', 'model_label': loc.encoder.info.label
                 if loc else '', 'engine': loc.encoder.name if loc else '', 'mode': s.mode if s else '',
                 'gate': loc.gate_note if loc else '', 'pose_source': s.pose_source if s else '',
                 'gate_fallback': 'true' if loc and loc.gate_fallback else 'false'}
        self._diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(), self.get_name(), self.stats,
                                                self._state_label, extra))


def main(args: list[str] | None = None) -> int:
    """Console script `fol-ros-node` (see `fol_ros.ros.run.run_node`)."""
    from fol_ros.ros.run import run_node
    return run_node(PlaceRecognitionNode, args)


if __name__ == '__main__':
    raise SystemExit(main())

"""The node's adapters without DDS traffic: parameters <-> config dataclasses, config/fol_ros.yaml, message
conversion, diagnostics, and a static check of launch/fol_ros.launch.py (a real launch check runs where
launch_ros is installed)."""
import ast
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import rclpy
import yaml
from rclpy.node import Node
from rclpy.parameter import Parameter

from fol_ros.config import GateConfig, PipelineConfig
from fol_ros.errors import BadInputError, ConfigError
from fol_ros.pipeline import Result, Status
from fol_ros.records import Candidate, Pose, RelativePose, StageTimings
from fol_ros import schema
from fol_ros.ros import convert, params
from fol_ros.ros.diagnostics import NodeStats, diagnostic_array
from fol_ros.verify.gate import Decision


@pytest.fixture(scope='module')
def ros():
    rclpy.init()
    yield
    rclpy.try_shutdown()


def _node(ros, overrides: dict) -> Node:
    node = Node('params_test', parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    params.declare_all(node)
    return node


def test_defaults_equal_the_dataclasses(ros):
    node = _node(ros, {'map_path': 'maps/x'})
    settings, config = params.read_all(node)
    assert config == PipelineConfig()
    assert settings == params.NodeSettings(map_path='maps/x')
    node.destroy_node()


def test_overrides_and_coercion(ros):
    node = _node(ros, {'mode': 'mapping', 'gate.exclude_recent_s': 12, 'gate.min_inliers': 15.0,
                       'model.input_size': [294, 294], 'verify.method': 'essential',
                       'verify.intrinsics': [500.0, 500.0, 320.0, 240.0], 'compressed': True})
    settings, config = params.read_all(node)
    assert settings.mode == 'mapping' and settings.compressed is True
    assert config.gate == GateConfig(exclude_recent_s=12.0, min_inliers=15)
    assert config.model.input_size == (294, 294) and config.verify.intrinsics == (500.0, 500.0, 320.0, 240.0)
    node.destroy_node()


@pytest.mark.parametrize('overrides, match', [
    ({'mode': 'localization'}, 'needs map_path'),
    ({'mode': 'slam', 'map_path': 'm'}, "mode='slam'"),
    ({'map_path': 'm', 'gate.min_inliers': 2.5}, 'gate.min_inliers=2.5 has the wrong type'),
    ({'map_path': 'm', 'model.input_size': [300, 300]}, 'model: input size 300x300'),
    ({'map_path': 'm', 'qos_reliability': 'sometimes'}, 'qos_reliability'),
    ({'map_path': 'm', 'verify.method': 'essential'}, 'intrinsics'),
    ({'map_path': 'm', 'autostart': 'yes'}, 'autostart'),
])
def test_bad_values_raise_config_error(ros, overrides, match):
    node = _node(ros, overrides)
    with pytest.raises(ConfigError, match=match):
        params.read_all(node)
    node.destroy_node()


def test_yaml_values_build_valid_configs(ros, repo_root):
    values = yaml.safe_load((repo_root / 'config' / 'fol_ros.yaml').read_text())['/**']['ros__parameters']
    values['map_path'] = 'maps/x'
    node = _node(ros, values)
    settings, config = params.read_all(node)
    assert settings == params.NodeSettings(map_path='maps/x') and config == PipelineConfig()
    node.destroy_node()


@pytest.mark.parametrize('name, value, configured, match', [
    ('gate.min_local_matches', 40, True, ''),                          # live: accepted while configured
    ('gate.min_local_matches', 2.5, False, 'wrong type'),
    ('gate.min_local_matches', -1, False, 'must be >= 0'),
    ('search.index_type', 'hnsw', True, 'read at configure'),          # would change nothing until configure
    ('search.index_type', 'hnsw', False, ''),
    ('mode', 'slam', False, 'not one of'),
    ('max_rate_hz', 'fast', True, 'wrong type'),
    ('use_sim_time', True, True, ''),                                  # rclpy's own parameter
])
def test_parameter_changes_are_checked(name, value, configured, match):
    reason = params.check_change(name, value, configured)
    assert (match in reason and reason) if match else reason == ''


def test_descriptors_carry_the_schema(ros):
    node = _node(ros, {})
    d = node.describe_parameter('gate.min_local_matches')
    assert 'FoL mutual-NN matches' in d.description and 'allowed: >= 0' in d.additional_constraints
    assert 'live' in d.additional_constraints
    assert 'read at configure' in node.describe_parameter('model.checkpoint').additional_constraints
    node.destroy_node()


def test_image_conversion_without_cv_bridge():
    from sensor_msgs.msg import CompressedImage, Image
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    msg = Image(height=2, width=3, encoding='bgr8', step=9, data=rgb[:, :, ::-1].tobytes())
    np.testing.assert_array_equal(convert.image_to_rgb(msg, 100), rgb)
    with pytest.raises(BadInputError, match='above the limit'):
        convert.image_to_rgb(msg, 5)
    with pytest.raises(BadInputError, match='neither JPEG nor PNG'):
        convert.image_to_rgb(CompressedImage(format='jpeg', data=b'not an image'), 100)


def test_result_and_loop_closure_messages():
    from fol_ros.msg import PlaceRecognition
    from std_msgs.msg import Header
    header = Header(frame_id='cam')
    header.stamp.sec, header.stamp.nanosec = 100, 5
    rot90 = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)   # 90 degrees about z
    cand = Candidate(place_id=7, retrieval_rank=2, global_similarity=0.8, local_matches=40, geometric_inliers=12,
                     confidence=0.5, stamp_ns=3 * 10**9 + 7, pose=Pose((1.0, 2.0, 3.0), frame_id='map'),
                     relative_pose=RelativePose(rot90, (0.0, 0.0, 1.0)))
    other = Candidate(place_id=9, retrieval_rank=0, global_similarity=0.7)
    decision = Decision(True, cand, 3, 'accepted')
    result = Result(Status.OK, [cand, other], StageTimings(encode_ms=5.0, total_ms=12.5), decision,
                    added_place_id=11)
    msg = convert.result_to_msg(result, header, 4, 'abc/map', max_candidates=1)   # the pipeline's own total
    assert msg.status == PlaceRecognition.STATUS_OK and msg.query_seq == 4 and len(msg.candidates) == 1
    c = msg.candidates[0]
    assert c.place_id == 7 and c.pose_known and c.pose.position.y == 2.0 and c.place_stamp.nanosec == 7
    assert msg.latency.encode_ms == 5.0 and msg.latency.total_ms == 12.5 and msg.added_place_id == 11
    lc = convert.loop_closure_to_msg(result, decision, header, 'abc/map')
    assert lc.match_place_id == 7 and lc.query_place_id == 11 and lc.temporal_support == 3
    assert lc.query_stamp.sec == 100 and lc.match_stamp.sec == 3 and lc.has_relative_pose
    q = lc.relative_pose.pose.orientation
    assert (q.z, q.w) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))
    pose = convert.matched_pose_msg(cand, header, (1, 2, 3, 4, 5, 6), 'map')
    assert pose.header.frame_id == 'map' and pose.pose.covariance[7] == 2.0 and pose.pose.covariance[35] == 6.0
    assert list(convert.time_pair_msg(100 * 10**9, 3 * 10**9).data) == [100.0, 3.0]
    no_pose = convert.candidate_to_msg(other, 'm')
    assert not no_pose.pose_known and no_pose.pose.orientation.w == 1.0


def test_diagnostics_levels_and_percentiles():
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticStatus
    stats = NodeStats(window=50)
    for i in range(10):
        stats.on_received(replaced_unprocessed=i % 2 == 1)
        stats.on_processed({'encode_ms': float(i), 'total_ms': 10.0 + i}, loop_closure=i == 9)
    array = diagnostic_array(Time(), 'n', stats, 'active', {'map_size': '12', 'engine': 'torch-cpu'})
    status = array.status[0]
    values = {kv.key: kv.value for kv in status.values}
    assert status.level == DiagnosticStatus.OK and status.hardware_id == 'torch-cpu'
    assert values['dropped_frames'] == '5' and values['processed'] == '10' and values['loop_closures'] == '1'
    assert float(values['encode_ms_p50']) == pytest.approx(4.5) and float(values['total_ms_p99']) > 18.5
    assert values['map_size'] == '12'
    stats.on_problem(True, 'bad encoding')
    warn = diagnostic_array(Time(), 'n', stats, 'active', {}).status[0]
    assert warn.level == DiagnosticStatus.WARN and 'bad encoding' in warn.message
    assert diagnostic_array(Time(), 'n', stats, 'active', {}).status[0].level == DiagnosticStatus.OK
    assert diagnostic_array(Time(), 'n', stats, 'unconfigured', {}).status[0].level == DiagnosticStatus.ERROR


class _Recorder:
    """Stand-in for a launch class: remembers its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _fake_launch_modules() -> dict:
    names = {'launch': ['LaunchDescription'], 'launch.actions': ['DeclareLaunchArgument', 'OpaqueFunction'],
             'launch.substitutions': ['PathJoinSubstitution'], 'launch_ros.actions': ['LifecycleNode'],
             'launch_ros.substitutions': ['FindPackageShare']}
    modules = {'launch_ros': types.ModuleType('launch_ros')}
    for mod, classes in names.items():
        modules[mod] = types.ModuleType(mod)
        for cls in classes:
            setattr(modules[mod], cls, type(cls, (_Recorder,), {}))
    return modules


def test_launch_file_static(repo_root, monkeypatch):
    path = repo_root / 'launch' / 'fol_ros.launch.py'
    text = path.read_text()
    ast.parse(text)
    assert '/home/' not in text and '/work/' not in text and "'/opt" not in text
    for name, module in _fake_launch_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location('fol_ros_launch_under_test', path)
    launch_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_file)
    description = launch_file.generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs['default_value'] for e in entities if type(e).__name__ == 'DeclareLaunchArgument'}
    assert set(declared) == {'image_topic', 'compressed', 'map_path', 'mode', 'checkpoint', 'engine', 'params_file',
                             'use_sim_time', 'namespace', 'autostart', 'odom_topic', 'strict_arguments',
                             'qos_reliability', 'pose_source', 'camera_frame', 'map_frame'}
    share = declared['params_file'].args[0]
    assert share[1:] == ['config', 'fol_ros.yaml'] and share[0].args == ('fol_ros',)
    setup = next(e for e in entities if type(e).__name__ == 'OpaqueFunction').kwargs['function']
    context = types.SimpleNamespace(argv=['image_topic:=/cam/image'], launch_configurations={
        'params_file': 'p.yaml', 'use_sim_time': 'true', 'namespace': 'robot1', 'image_topic': '/cam/image',
        'compressed': 'true', 'map_path': '', 'mode': '', 'checkpoint': 'w.pth', 'engine': '', 'autostart': 'false'})
    node, = setup(context)
    kw = node.kwargs
    assert kw['package'] == 'fol_ros' and kw['executable'] == 'place_recognition_node'
    assert kw['namespace'] == 'robot1' and kw['name'] == 'place_recognition_node'
    assert kw['parameters'][0] == 'p.yaml'
    assert kw['parameters'][1] == {'use_sim_time': True, 'image_topic': '/cam/image', 'compressed': True,
                                   'model.checkpoint': 'w.pth', 'autostart': False}
    declared_params = set(schema.by_name()) | {'use_sim_time'}
    assert set(kw['parameters'][1]) <= declared_params
    # the executable is installed by CMake and is a python launcher of this node
    assert 'scripts/place_recognition_node' in (repo_root / 'CMakeLists.txt').read_text()
    launcher = (repo_root / 'scripts' / 'place_recognition_node')
    assert launcher.stat().st_mode & 0o111 and 'fol_ros.ros.node import main' in launcher.read_text()
    with pytest.raises(ValueError, match='true or false'):
        setup(types.SimpleNamespace(launch_configurations={'params_file': 'p', 'compressed': 'maybe'}))
    # the README once passed map:= (no such argument): launch would ignore it and the node would stay unconfigured
    with pytest.raises(RuntimeError, match='unknown launch argument.*map .did you mean map_path'):
        setup(types.SimpleNamespace(argv=['map:=/maps/x'], launch_configurations={'params_file': 'p'}))
    node, = setup(types.SimpleNamespace(argv=['map:=/maps/x'], launch_configurations={
        'params_file': 'p', 'strict_arguments': 'false'}))


def test_launch_file_with_real_launch(repo_root):
    pytest.importorskip('launch_ros')
    spec = importlib.util.spec_from_file_location('fol_ros_launch_real', repo_root / 'launch' / 'fol_ros.launch.py')
    launch_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_file)
    description = launch_file.generate_launch_description()
    names = {a.name for a in description.get_launch_arguments()}
    assert {'image_topic', 'compressed', 'map_path', 'checkpoint', 'engine', 'params_file', 'use_sim_time',
            'namespace'} <= names

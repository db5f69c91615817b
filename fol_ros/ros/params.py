"""ROS parameters of the node: declared from the config.py dataclasses and converted back into them.

Core settings are `<stage>.<field>` (e.g. `gate.min_global_similarity`), one per field of the PipelineConfig
groups, with the dataclass default; the node's own settings (topics, QoS, rate, mode) are in `NodeSettings`.
config/fol_ros.yaml documents every one. Values are validated by the dataclasses (ConfigError).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import ParameterUninitializedException

from fol_ros.config import (EngineConfig, GateConfig, KeyframeConfig, ModelConfig, PipelineConfig, RerankConfig,
                            SearchConfig, VerifyConfig)
from fol_ros.errors import ConfigError
from fol_ros.image import DEFAULT_MAX_PIXELS

GROUPS = {'model': ModelConfig, 'engine': EngineConfig, 'search': SearchConfig, 'rerank': RerankConfig,
          'verify': VerifyConfig, 'gate': GateConfig, 'keyframe': KeyframeConfig}
# Fields whose default is None but whose parameter is a (possibly empty) list of doubles.
OPTIONAL_DOUBLE_ARRAYS = {('verify', 'intrinsics')}
MODES = ('localization', 'mapping')
RELIABILITIES = ('best_effort', 'reliable')


@dataclass(frozen=True)
class NodeSettings:
    """The node's own settings (everything that is not a core stage setting)."""

    autostart: bool = False
    mode: str = 'localization'
    map_path: str = ''
    save_map_on_cleanup: bool = False
    image_topic: str = 'image'
    compressed: bool = False
    odom_topic: str = ''
    qos_reliability: str = 'best_effort'
    qos_depth: int = 1
    max_rate_hz: float = 2.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    use_cv_bridge: bool = True
    max_candidates: int = 5
    publish_pose: bool = True
    publish_time_pair: bool = False
    pose_covariance: tuple[float, ...] = (1.0, 1.0, 1.0, 0.1, 0.1, 0.1)
    map_frame: str = 'map'
    diagnostics_period_s: float = 1.0
    bad_input_log_period_s: float = 5.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f'mode={self.mode!r} is not one of {", ".join(MODES)}')
        if self.qos_reliability not in RELIABILITIES:
            raise ConfigError(f'qos_reliability={self.qos_reliability!r} is not one of {", ".join(RELIABILITIES)}')
        if self.qos_depth < 1:
            raise ConfigError(f'qos_depth={self.qos_depth} must be >= 1')
        if self.max_rate_hz < 0 or self.diagnostics_period_s <= 0:
            raise ConfigError('max_rate_hz must be >= 0 (0 = unlimited) and diagnostics_period_s > 0')
        if len(self.pose_covariance) != 6:
            raise ConfigError(f'pose_covariance needs 6 values (x y z roll pitch yaw variances), '
                              f'got {len(self.pose_covariance)}')
        if self.mode == 'localization' and not self.map_path:
            raise ConfigError('mode localization needs map_path: build one with `fol-ros map build` '
                              'or use mode mapping')


def _declarations() -> list[tuple[str, object]]:
    """(parameter name, default value) for every parameter, node settings first."""
    out = [(f.name, f.default) for f in dataclasses.fields(NodeSettings)]
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if default is None and (group, f.name) in OPTIONAL_DOUBLE_ARRAYS:
                default = ()
            out.append((f'{group}.{f.name}', default))
    return out


def declare_all(node) -> None:
    """Declare every parameter on `node` (values from the params file or overrides win over the defaults)."""
    for name, default in _declarations():
        value = list(default) if isinstance(default, tuple) else default
        # dynamic typing: an int in YAML for a float setting (30 for 30.0) is coerced by read_all, not refused
        descriptor = ParameterDescriptor(description=_DESCRIPTIONS.get(name, name), dynamic_typing=True)
        node.declare_parameter(name, value, descriptor)


def _coerce(name: str, value: object, default: object) -> object:
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer() or isinstance(value, (bool, str, list)):
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, (bool, str, list)):
                raise TypeError
            return float(value)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(default, tuple):
            if isinstance(value, (bool, str, int, float)):
                raise TypeError
            if default and isinstance(default[0], int):
                if any(float(v) != int(v) for v in value):
                    raise TypeError
                return tuple(int(v) for v in value)
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f'parameter {name}={value!r} has the wrong type; expected {type(default).__name__} '
                      f'like the default {default!r}')


def read_all(node) -> tuple[NodeSettings, PipelineConfig]:
    """Read the declared parameters back into (NodeSettings, PipelineConfig).

    Raises:
        ConfigError: a value of the wrong type or out of range (the message names the parameter).
    """
    values = {}
    for name, default in _declarations():
        try:
            value = node.get_parameter(name).value
        except ParameterUninitializedException:
            value = None   # an empty list in a params file leaves the parameter unset: the default applies
        values[name] = default if value is None else _coerce(name, value, default)
    settings = NodeSettings(**{f.name: values[f.name] for f in dataclasses.fields(NodeSettings)})
    groups = {}
    for group, cls in GROUPS.items():
        kwargs = {f.name: values[f'{group}.{f.name}'] for f in dataclasses.fields(cls)}
        if group == 'verify':
            kwargs['intrinsics'] = kwargs['intrinsics'] or None
            if kwargs['intrinsics'] is not None and len(kwargs['intrinsics']) != 4:
                raise ConfigError('verify.intrinsics needs 4 values (fx, fy, cx, cy) or none')
        try:
            groups[group] = cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f'{group}: {exc}') from exc
    return settings, PipelineConfig(**groups)


_DESCRIPTIONS = {
    'autostart': 'configure and activate at start-up (for users without a lifecycle manager)',
    'mode': "'localization' (match against map_path, read-only) or 'mapping' (add keyframes, close loops)",
    'map_path': 'place map directory to load (localization) or to load if present and save to (mapping)',
    'image_topic': 'camera topic (sensor_msgs/Image, or CompressedImage when compressed is true)',
    'compressed': 'subscribe to sensor_msgs/CompressedImage (JPEG/PNG) instead of Image',
    'odom_topic': 'nav_msgs/Odometry topic giving the camera pose for keyframes and candidates ("" = none)',
    'qos_reliability': "image subscription reliability: 'best_effort' (sensor data) or 'reliable'",
    'qos_depth': 'image subscription queue depth (the node keeps only the newest frame anyway)',
    'max_rate_hz': 'maximum processing rate in frames per second (0 = as fast as possible)',
    'max_image_pixels': 'frames with more pixels are rejected as bad input',
}

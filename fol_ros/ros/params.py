"""ROS parameters of the node, generated from the settings schema (fol_ros/config.py via fol_ros/schema.py).

Every setting is declared with a descriptor that carries its meaning, unit, range and whether it is live.
`check_change` is the node's on-set-parameters check: a value of the wrong type or out of range is refused with
the reason, and so is a change to a setting that is read at configure while the node is configured (it would
otherwise report success and change nothing); live settings take effect on the next frame.
"""
from __future__ import annotations

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import ParameterUninitializedException

from fol_ros import schema
from fol_ros.config import NodeSettings, PipelineConfig
from fol_ros.errors import ConfigError

__all__ = ['NodeSettings', 'declare_all', 'read_all', 'check_change', 'descriptor']


def descriptor(param: schema.Param) -> ParameterDescriptor:
    """The ROS descriptor of one setting (`ros2 param describe` shows it)."""
    constraints = [f'allowed: {param.range_text}' if param.range_text else '',
                   f'unit: {param.unit}' if param.unit else '',
                   'live: takes effect on the next frame' if param.live else 'read at configure']
    # dynamic typing: an int in YAML for a float setting (30 for 30.0) is coerced by the schema, not refused by
    # rclpy; the schema's own checks (type, range, choices) run in check_change and read_all with clear messages
    return ParameterDescriptor(description=param.doc, additional_constraints='; '.join(c for c in constraints if c),
                               dynamic_typing=True)


def declare_all(node) -> None:
    """Declare every parameter on `node` (values from the params file or overrides win over the defaults)."""
    for param in schema.parameters():
        default = param.default
        value = [] if param.optional else list(default) if isinstance(default, tuple) else default
        node.declare_parameter(param.name, value, descriptor(param))


def read_all(node, changes: dict | None = None) -> tuple[NodeSettings, PipelineConfig]:
    """Read the declared parameters back into (NodeSettings, PipelineConfig), with `changes` (name -> value, a
    parameter change being validated) applied over the current values.

    Raises:
        ConfigError: a value of the wrong type or out of range (the message names the parameter).
    """
    changes = changes or {}
    values = {}
    for param in schema.parameters():
        try:
            value = changes[param.name] if param.name in changes else node.get_parameter(param.name).value
        except ParameterUninitializedException:
            value = None   # an empty list in a params file leaves the parameter unset: the default applies
        if value is not None and not (param.optional and value == []):
            values[param.name] = value
    return schema.node_settings(values), schema.pipeline_config(values)


def check_change(name: str, value: object, configured: bool) -> str:
    """Why `ros2 param set name value` must be refused, or '' when it is acceptable.

    Args:
        configured: the node holds a configuration (inactive or active), so only live settings may change.
    """
    params = schema.by_name()
    param = params.get(name)
    if param is None:
        return ''   # rclpy's own parameters (use_sim_time, ...)
    try:
        typed = schema.coerce(param, value)
    except ConfigError as exc:
        return str(exc)
    reason = schema.check_value(param, typed) if typed is not None else ''
    if reason:
        return f'{param.group + "." if param.group else ""}{reason}'
    if configured and not param.live:
        return (f'{name} is read at configure: deactivate and cleanup the node, set it, then configure again '
                '(live settings take effect at once)')
    return ''

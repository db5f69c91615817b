"""Start place_recognition_node (a lifecycle node) with the package's parameters file.

    ros2 launch fol_ros fol_ros.launch.py image_topic:=/camera/image_raw map_path:=maps/office
    ros2 launch fol_ros fol_ros.launch.py compressed:=true image_topic:=/camera/image_raw/compressed \
        mode:=mapping map_path:=maps/new use_sim_time:=true        # with `ros2 bag play --clock`

The arguments that override parameters come from the settings schema (fol_ros/config.py, `launch=`), so they cannot
drift from the node. Arguments given here override the params file; everything else comes from params_file
(config/fol_ros.yaml). An argument this file does not know stops the launch with the valid names (launch itself would
ignore `map:=...` silently); when you include this file from another launch file whose own arguments end up on the
command line, pass strict_arguments:=false. With autostart:=false the node waits in 'unconfigured' for a lifecycle
manager (or `ros2 lifecycle set`).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.substitutions import FindPackageShare

from fol_ros.schema import launch_arguments, parse_bool, unknown_names

# (argument, default, description) of the arguments that are not node parameters of the schema
OWN_ARGUMENTS = (
    ('use_sim_time', 'false', 'use /clock (true with `ros2 bag play --clock`)'),
    ('namespace', '', 'namespace of the node and its topics'),
    ('strict_arguments', 'true', 'false: ignore command-line arguments this launch file does not declare'),
)


def _check_known(argv, known: set[str]) -> None:
    """Refuse `name:=value` command-line arguments that no DeclareLaunchArgument of this file declares."""
    unknown = unknown_names([str(a).split(':=', 1)[0] for a in argv or () if ':=' in str(a)], known)
    if unknown:
        raise RuntimeError(f'fol_ros.launch.py: unknown launch argument(s): {", ".join(unknown)}. '
                           f'Valid: {", ".join(sorted(known))}. Any parameter can be set in params_file.')


def _value(kind: str, name: str, text: str):
    if kind == 'bool':
        return parse_bool(text, name)
    if kind == 'int':
        return int(text)
    if kind == 'float':
        return float(text)
    return text


def _launch_setup(context, *args, **kwargs) -> list:
    """Build the node once the arguments are known, passing on only the overrides that were given."""
    values = context.launch_configurations
    known = {'params_file', *(name for name, _, _ in OWN_ARGUMENTS), *(a for a, _, _, _ in launch_arguments())}
    if parse_bool(values.get('strict_arguments', 'true'), 'strict_arguments'):
        _check_known(getattr(context, 'argv', ()), known)
    overrides = {'use_sim_time': parse_bool(values.get('use_sim_time', 'false'), 'use_sim_time')}
    for argument, parameter, kind, _ in launch_arguments():
        text = values.get(argument, '')
        if text != '':
            overrides[parameter] = _value(kind, argument, text)
    node = LifecycleNode(
        package='fol_ros', executable='place_recognition_node', name='place_recognition_node',
        namespace=values.get('namespace', ''), output='screen',
        parameters=[values['params_file'], overrides])
    return [node]


def generate_launch_description() -> LaunchDescription:
    """Launch arguments (params_file, the schema's overrides, use_sim_time, namespace) and one LifecycleNode."""
    declare_params_file_cmd = DeclareLaunchArgument(
        'params_file', default_value=PathJoinSubstitution([FindPackageShare('fol_ros'), 'config', 'fol_ros.yaml']),
        description='parameters file (every parameter documented in config/fol_ros.yaml)')
    own = [DeclareLaunchArgument(name, default_value=default, description=text)
           for name, default, text in OWN_ARGUMENTS]
    overrides = [DeclareLaunchArgument(name, default_value='', description=f'{text} ("" = params file)')
                 for name, _, _, text in launch_arguments()]
    return LaunchDescription([declare_params_file_cmd, *own, *overrides, OpaqueFunction(function=_launch_setup)])

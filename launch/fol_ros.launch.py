"""Start place_recognition_node (a lifecycle node) with the package's parameters file.

    ros2 launch fol_ros fol_ros.launch.py image_topic:=/camera/image_raw map_path:=maps/office
    ros2 launch fol_ros fol_ros.launch.py compressed:=true image_topic:=/camera/image_raw/compressed \
        mode:=mapping map_path:=maps/new use_sim_time:=true        # with `ros2 bag play --clock`

Arguments given here override the params file; everything else comes from params_file (config/fol_ros.yaml).
With autostart:=false the node waits in 'unconfigured' for a lifecycle manager (or `ros2 lifecycle set`).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.substitutions import FindPackageShare

# (argument, parameter it overrides, value type); an empty argument keeps the params file's value.
ARGUMENTS = (
    ('image_topic', 'image_topic', str, 'camera topic (sensor_msgs/Image, or CompressedImage with compressed:=true)'),
    ('compressed', 'compressed', bool, 'true: subscribe to sensor_msgs/CompressedImage (JPEG/PNG)'),
    ('map_path', 'map_path', str, 'place map directory to load (localization) or to grow and save (mapping)'),
    ('mode', 'mode', str, "'localization' (prebuilt map) or 'mapping' (online keyframes, loop closure)"),
    ('checkpoint', 'model.checkpoint', str, 'FoL checkpoint (.pth); the params file default is the ViT-S/14'),
    ('engine', 'engine.engine', str, 'inference engine: auto, torch, onnxruntime or tensorrt'),
    ('autostart', 'autostart', bool, 'true: configure and activate at start-up; false: wait for a manager'),
)


def _parse_bool(name: str, text: str) -> bool:
    if text.lower() in ('true', '1', 'yes'):
        return True
    if text.lower() in ('false', '0', 'no'):
        return False
    raise ValueError(f'launch argument {name}:={text!r} must be true or false')


def _launch_setup(context, *args, **kwargs) -> list:
    """Build the node once the arguments are known, passing on only the overrides that were given."""
    values = context.launch_configurations
    overrides = {'use_sim_time': _parse_bool('use_sim_time', values.get('use_sim_time', 'false'))}
    for argument, parameter, kind, _ in ARGUMENTS:
        text = values.get(argument, '')
        if text != '':
            overrides[parameter] = _parse_bool(argument, text) if kind is bool else text
    node = LifecycleNode(
        package='fol_ros', executable='place_recognition_node', name='place_recognition_node',
        namespace=values.get('namespace', ''), output='screen',
        parameters=[values['params_file'], overrides])
    return [node]


def generate_launch_description() -> LaunchDescription:
    """Launch arguments (params_file, the overrides above, use_sim_time, namespace) and one LifecycleNode."""
    declare_params_file_cmd = DeclareLaunchArgument(
        'params_file', default_value=PathJoinSubstitution([FindPackageShare('fol_ros'), 'config', 'fol_ros.yaml']),
        description='parameters file (every parameter documented in config/fol_ros.yaml)')
    declare_use_sim_time_cmd = DeclareLaunchArgument(
        'use_sim_time', default_value='false', description='use /clock (true with `ros2 bag play --clock`)')
    declare_namespace_cmd = DeclareLaunchArgument('namespace', default_value='',
                                                  description='namespace of the node and its topics')
    declare_cmds = [DeclareLaunchArgument(name, default_value='', description=f'{text} ("" = params file)')
                    for name, _, _, text in ARGUMENTS]
    return LaunchDescription([declare_params_file_cmd, declare_use_sim_time_cmd, declare_namespace_cmd,
                              *declare_cmds, OpaqueFunction(function=_launch_setup)])

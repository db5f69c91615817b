"""Programs around the node, not part of it: the live recorder (`fol-ros-recorder`, `ros2 run fol_ros
loop_closure_recorder`), the bag player (`fol-ros-play`) and the end-to-end demo (`make demo`).

Like `fol_ros/ros/`, these talk ROS 2; the core (everything else under fol_ros/) imports no ROS.
"""

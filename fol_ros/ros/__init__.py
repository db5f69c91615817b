"""The ROS 2 layer: the only package that imports rclpy, sensor_msgs or fol_ros.msg."""

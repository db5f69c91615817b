"""ROS-free pose-graph back end for FoL loop closures (GTSAM), and trajectory error against ground truth (evo).

    from fol_ros.posegraph import LoopPoseGraph, LoopConstraint, PoseGraphSettings
    graph = LoopPoseGraph(PoseGraphSettings())
    graph.add_odometry(stamp_ns, pose)        # every odometry sample
    graph.add_loop_closure(constraint)        # every accepted LoopClosure
    graph.optimise(); graph.trajectory(); graph.latest_pose()

`fol_ros/ros/posegraph_node.py` is the same on ROS topics.
"""
from fol_ros.posegraph.closures import LoopConstraint
from fol_ros.posegraph.graph import LoopPoseGraph, replay
from fol_ros.posegraph.settings import PoseGraphSettings
from fol_ros.posegraph.trajectory import Trajectory, ate_rmse, trajectory_errors

__all__ = ['LoopConstraint', 'LoopPoseGraph', 'PoseGraphSettings', 'Trajectory', 'ate_rmse', 'replay',
           'trajectory_errors']

"""Trajectory error of a bag replay: the bag's odometry alone vs the same odometry plus the loop closures the
pipeline accepted, both against the bag's ground-truth topic (the `trajectory` block of the evaluation JSON).

The closures go through the same ROS-free pose graph fol-ros-posegraph runs (fol_ros.posegraph.replay), fed in
stamp order as they would arrive live.
"""
from __future__ import annotations

from pathlib import Path

from fol_ros.errors import BadInputError
from fol_ros.posegraph import LoopConstraint, PoseGraphSettings, Trajectory, replay, trajectory_errors


def bag_trajectory_errors(bag: Path, odometry_topic: str, ground_truth_topic: str,
                          closures: list[LoopConstraint], settings: PoseGraphSettings = PoseGraphSettings()) -> dict:
    """{'ate_odometry_m', 'ate_loop_closed_m', ...} for the bag (see fol_ros.posegraph.trajectory_errors)."""
    from fol_ros.sources import read_bag_poses
    odometry = list(read_bag_poses(bag, odometry_topic))
    truth = list(read_bag_poses(bag, ground_truth_topic))
    if not odometry or not truth:
        raise BadInputError(f'{bag}: trajectory error needs poses on both {odometry_topic} ({len(odometry)}) and '
                            f'{ground_truth_topic} ({len(truth)})')
    graph = replay(odometry, closures, settings)
    block = trajectory_errors(Trajectory.from_poses(truth), Trajectory.from_poses(odometry), graph.trajectory())
    block.update(n_loop_closures=len(graph.closures), n_outlier_closures=sum(w < 0.1 for w in graph.closure_weights()),
                 robust_kernel=settings.robust_kernel)
    return block

"""Trajectories (stamped poses) and their absolute trajectory error against ground truth, computed with `evo`.

ATE here is evo's APE on the translation part, RMSE in metres, after associating poses by stamp. No alignment is
applied: the estimates are map-frame trajectories and the odometry starts at the true start pose, so an SE(3)
(Umeyama) fit would only hide drift that a robot using these poses in the map would suffer.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fol_ros.records import Pose

_NS = 1_000_000_000


@dataclass(frozen=True)
class Trajectory:
    """N poses: stamps_ns int64 [N], positions float64 [N, 3], quaternions (x, y, z, w) float64 [N, 4]."""

    stamps_ns: np.ndarray
    positions: np.ndarray
    quaternions: np.ndarray

    @staticmethod
    def from_poses(stamped: Iterable[tuple[int, Pose]]) -> 'Trajectory':
        items = sorted(stamped, key=lambda sp: sp[0])
        return Trajectory(np.array([s for s, _ in items], np.int64).reshape(-1),
                          np.array([p.position for _, p in items], np.float64).reshape(-1, 3),
                          np.array([p.orientation for _, p in items], np.float64).reshape(-1, 4))

    def __len__(self) -> int:
        return len(self.stamps_ns)

    def poses(self) -> list[tuple[int, Pose]]:
        return [(int(s), Pose(tuple(map(float, p)), tuple(map(float, q))))
                for s, p, q in zip(self.stamps_ns, self.positions, self.quaternions)]

    def to_json(self) -> dict:
        """Compact form for the evaluation JSON (seconds and metres; the report plots x, y)."""
        return {'t': [round(s / _NS, 6) for s in self.stamps_ns.tolist()],
                'xyz': np.round(self.positions, 4).tolist()}


def _to_evo(traj: Trajectory):
    from evo.core.trajectory import PoseTrajectory3D
    # evo wants quaternions (w, x, y, z); stamps relative to the first one keep float64 precision at sub-ms level
    wxyz = traj.quaternions[:, [3, 0, 1, 2]]
    return PoseTrajectory3D(positions_xyz=traj.positions, orientations_quat_wxyz=wxyz,
                            timestamps=traj.stamps_ns.astype(np.float64) / _NS)


def ate_rmse(reference: Trajectory, estimate: Trajectory, max_diff_s: float = 0.05) -> float:
    """Absolute trajectory error (evo APE, translation part, RMSE in metres), poses associated by stamp within
    max_diff_s, no alignment (see the module docstring). Raises ValueError when no stamps associate."""
    from evo.core import metrics, sync
    if len(reference) == 0 or len(estimate) == 0:
        raise ValueError('ATE needs two non-empty trajectories')
    ref, est = sync.associate_trajectories(_to_evo(reference), _to_evo(estimate), max_diff=max_diff_s)
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, est))
    return float(ape.get_statistic(metrics.StatisticsType.rmse))


def trajectory_errors(ground_truth: Trajectory, odometry: Trajectory, loop_closed: Trajectory,
                      max_diff_s: float = 0.05) -> dict:
    """The evaluation JSON's `trajectory` block: both ATE figures and the three trajectories for the report."""
    ate_odom = ate_rmse(ground_truth, odometry, max_diff_s)
    ate_closed = ate_rmse(ground_truth, loop_closed, max_diff_s)
    return {'ate_odometry_m': ate_odom, 'ate_loop_closed_m': ate_closed,
            'drift_removed': (1.0 - ate_closed / ate_odom) if ate_odom > 0 else 0.0,
            'metric': 'evo APE, translation part, RMSE (m)', 'alignment': 'none (map frame)',
            'ground_truth': ground_truth.to_json(), 'odometry': odometry.to_json(),
            'loop_closed': loop_closed.to_json()}

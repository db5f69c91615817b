"""Conversions between fol_ros's `Pose` (position + quaternion x, y, z, w) and GTSAM's `Pose3`, and between the two
orders of a 6x6 pose covariance.

ROS messages order a pose covariance (x, y, z, rot_x, rot_y, rot_z); GTSAM's Pose3 tangent space is
(rot_x, rot_y, rot_z, x, y, z). Passing one for the other would swap metres and radians silently.
"""
from __future__ import annotations

import gtsam
import numpy as np

from fol_ros.records import Pose

# ROS index of each GTSAM tangent coordinate: GTSAM (rx, ry, rz, x, y, z) <- ROS (x, y, z, rx, ry, rz).
_GTSAM_FROM_ROS = np.array([3, 4, 5, 0, 1, 2])


def to_pose3(pose: Pose) -> gtsam.Pose3:
    x, y, z, w = pose.orientation
    return gtsam.Pose3(gtsam.Rot3.Quaternion(w, x, y, z), np.asarray(pose.position, np.float64))


def from_pose3(pose: gtsam.Pose3, frame_id: str = 'map') -> Pose:
    q = pose.rotation().toQuaternion()    # Eigen quaternion: w(), x(), y(), z()
    t = pose.translation()
    return Pose((float(t[0]), float(t[1]), float(t[2])), (float(q.x()), float(q.y()), float(q.z()), float(q.w())),
                frame_id)


def pose7_to_pose3(values: tuple[float, ...]) -> gtsam.Pose3:
    """(x, y, z, qx, qy, qz, qw) -> Pose3."""
    return to_pose3(Pose(tuple(values[:3]), tuple(values[3:7])))


def covariance_ros_to_gtsam(cov: np.ndarray) -> np.ndarray:
    cov = np.asarray(cov, np.float64).reshape(6, 6)
    return cov[np.ix_(_GTSAM_FROM_ROS, _GTSAM_FROM_ROS)]


def covariance_gtsam_to_ros(cov: np.ndarray) -> np.ndarray:
    cov = np.asarray(cov, np.float64).reshape(6, 6)
    back = np.argsort(_GTSAM_FROM_ROS)
    return cov[np.ix_(back, back)]


def diagonal_sigmas(sigma_m: float, sigma_rad: float) -> np.ndarray:
    """GTSAM-ordered sigmas: three rotations, then three translations."""
    return np.array([sigma_rad] * 3 + [sigma_m] * 3, np.float64)

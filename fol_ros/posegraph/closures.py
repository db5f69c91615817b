"""A loop closure as the pose graph sees it, and the measurement + noise it contributes (pure functions).

`LoopConstraint` is the ROS-free content of a `fol_ros/LoopClosure` message. Two kinds of measurement:

* with a relative pose (verification estimated T_match_query): that transform, moved from camera to body frames,
  with the covariance the message states. Monocular geometry gives a unit translation with unknown scale; the
  message then already carries an inflated translation covariance, which is used as it is.
* without one (the default `verify.method: fundamental` estimates none): "the query is at the matched place", i.e.
  the identity transform, with a translation sigma of one place spacing and a loose rotation sigma.
"""
from __future__ import annotations

from dataclasses import dataclass

import gtsam
import numpy as np

from fol_ros.posegraph.se3 import covariance_ros_to_gtsam, diagonal_sigmas, pose7_to_pose3, to_pose3
from fol_ros.posegraph.settings import PoseGraphSettings
from fol_ros.records import Candidate, Pose


@dataclass(frozen=True)
class LoopConstraint:
    """One accepted loop closure.

    Attributes:
        query_stamp_ns, match_stamp_ns: camera times of the query image and of the matched place.
        match_place_id: the place's id in its map (prior-map places become one graph variable per id).
        place_pose: the place's pose in the map frame (candidate.pose when pose_known), else None.
        relative_pose: T_match_query in camera frames when the message has one, else None.
        relative_covariance: 36 numbers, row-major, ROS order (x, y, z, rx, ry, rz); used with relative_pose.
        translation_scale_known: False for a monocular (unit) translation.
    """

    query_stamp_ns: int
    match_stamp_ns: int
    match_place_id: int
    place_pose: Pose | None = None
    relative_pose: Pose | None = None
    relative_covariance: tuple[float, ...] = ()
    translation_scale_known: bool = False


def _is_covariance(cov: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(cov)) and np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0))


def closure_measurement(c: LoopConstraint, settings: PoseGraphSettings) -> tuple[gtsam.Pose3, np.ndarray]:
    """(T_matchbody_querybody, 6x6 covariance in GTSAM order) of one closure, before any robust kernel."""
    if c.relative_pose is not None:
        cov = covariance_ros_to_gtsam(np.asarray(c.relative_covariance, np.float64)) \
            if len(c.relative_covariance) == 36 else np.zeros((6, 6))
        if _is_covariance(cov):
            # Same rigid camera on both frames: T_body = C T_cam C^-1, and a tangent perturbation moves with the
            # adjoint of C. The translation stays a unit direction when its scale is unknown: the message's
            # inflated translation covariance is what keeps it from pulling as if it were metric.
            cam = pose7_to_pose3(settings.camera_in_body)
            z = cam.compose(to_pose3(c.relative_pose)).compose(cam.inverse())
            ad = cam.AdjointMap()
            return z, ad @ cov @ ad.T
        # a message without a usable covariance: trust its pose no more than a bare place match
    sigmas = diagonal_sigmas(settings.place_spacing_m, settings.place_sigma_rad)
    return gtsam.Pose3(), np.diag(sigmas ** 2)


def robust_noise(covariance: np.ndarray, settings: PoseGraphSettings) -> gtsam.noiseModel.Base:
    """Gaussian noise of the closure wrapped in the configured robust kernel (see graph.py for the choice)."""
    gaussian = gtsam.noiseModel.Gaussian.Covariance(covariance)
    kernels = gtsam.noiseModel.mEstimator
    make = {'dcs': kernels.DCS, 'cauchy': kernels.Cauchy, 'huber': kernels.Huber}.get(settings.robust_kernel)
    if make is None:
        return gaussian
    return gtsam.noiseModel.Robust.Create(make.Create(settings.robust_parameter), gaussian)


def constraint_from_candidate(query_stamp_ns: int, candidate: Candidate) -> LoopConstraint:
    """The same constraint from the pipeline's accepted candidate (what the node turns into a LoopClosure)."""
    rel = candidate.relative_pose
    relative = None
    if rel is not None:
        q = gtsam.Rot3(np.asarray(rel.rotation, np.float64).reshape(3, 3)).toQuaternion()
        relative = Pose(tuple(float(v) for v in rel.translation), (q.x(), q.y(), q.z(), q.w()))
    return LoopConstraint(int(query_stamp_ns), int(candidate.stamp_ns), int(candidate.place_id), candidate.pose,
                          relative, tuple(rel.covariance) if rel is not None else (),
                          bool(rel.scale_known) if rel is not None else False)

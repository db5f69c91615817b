"""A GTSAM pose graph that turns drifting odometry plus FoL loop closures into a map-frame trajectory.

Variables: one pose X(i) per odometry keyframe (a new one every `keyframe_distance_m` or `keyframe_angle_rad`), and
one pose L(place) per prior-map place that a closure matched. Factors:

* a prior on X(0) at the first odometry pose (the odometry frame starts aligned with the map frame);
* an odometry between-factor X(i-1) -> X(i), Gaussian, sigma growing with the distance travelled;
* for every loop closure, a between-factor from the matched place to the query's keyframe: to L(place) (itself
  held by a tight prior at the map's pose) when the place belongs to a prior map, or to the keyframe X(j) at the
  match time when the place was seen earlier in this same session. Its measurement and covariance come from
  `closures.closure_measurement`; the query's and match's offsets from their keyframes are the odometry between
  them, so a closure need not fall exactly on a keyframe.

Robust kernel: DCS (dynamic covariance scaling, Agarwal et al., ICRA 2013) on the loop-closure factors only. It was
designed for exactly this failure: a false loop closure in a pose graph. Like switchable constraints it scales a
closure's information down, by s = min(1, 2 Phi / (Phi + chi2)), but in closed form, without a switch variable per
closure. Its weight s^2 is exactly 1 for a closure that agrees with the rest (chi2 <= Phi), so true closures keep
their full Gaussian weight (Cauchy already halves a 1-sigma residual), and it falls as 1/chi2^2, so a closure many
sigmas off the odometry has no measurable pull; Huber's influence never falls (a constant pull per false closure
does bend the trajectory, see test/test_posegraph.py). The price of any redescending kernel is that it needs a fair
initial guess: closures are added online, each one against a trajectory the earlier closures already corrected,
which is why the graph is incremental (iSAM2) rather than one batch solve over fully drifted odometry.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import gtsam
import numpy as np

from fol_ros.pose_track import nearest_index
from fol_ros.posegraph.closures import LoopConstraint, closure_measurement, robust_noise
from fol_ros.posegraph.se3 import covariance_gtsam_to_ros, diagonal_sigmas, from_pose3, to_pose3
from fol_ros.posegraph.settings import PoseGraphSettings
from fol_ros.posegraph.trajectory import Trajectory
from fol_ros.records import Pose

log = logging.getLogger(__name__)
_NS = 1_000_000_000
ODOMETRY_BUFFER = 20_000    # odometry samples kept to place closures between keyframes (minutes at 100 Hz)


def X(i: int) -> int:
    return gtsam.symbol('x', i)


def L(place_id: int) -> int:
    return gtsam.symbol('l', place_id)


@dataclass
class Keyframe:
    stamp_ns: int
    odom: gtsam.Pose3       # odometry pose at this keyframe (odometry frame)


@dataclass
class ClosureRecord:
    """A closure in the graph: its factor (to read its robust weight back) and what it connects."""

    constraint: LoopConstraint
    factor: gtsam.NonlinearFactor
    noise: gtsam.noiseModel.Base


class LoopPoseGraph:
    """Incremental pose graph: `add_odometry` for every odometry sample, `add_loop_closure` for every accepted
    closure, `optimise()` whenever outputs are wanted (cheap when nothing changed)."""

    def __init__(self, settings: PoseGraphSettings = PoseGraphSettings()) -> None:
        self.settings = settings
        params = gtsam.ISAM2Params()
        params.setRelinearizeThreshold(0.01)
        params.relinearizeSkip = 1     # a closure moves many poses at once: relinearise them on the next update
        self.isam = gtsam.ISAM2(params)
        self.keyframes: list[Keyframe] = []
        self.places: set[int] = set()
        self.closures: list[ClosureRecord] = []
        self.pending: list[LoopConstraint] = []
        self.rejected = 0
        self._odom_stamps: deque[int] = deque(maxlen=ODOMETRY_BUFFER)
        self._odom_poses: deque[gtsam.Pose3] = deque(maxlen=ODOMETRY_BUFFER)
        self._new_factors = gtsam.NonlinearFactorGraph()
        self._new_values = gtsam.Values()
        self._estimate = gtsam.Values()
        self._closure_added = False

    # inputs -------------------------------------------------------------------------------------------------------
    def add_odometry(self, stamp_ns: int, pose: Pose) -> bool:
        """One odometry sample (odometry frame, stamps increasing); returns True when it became a keyframe."""
        odom = to_pose3(pose)
        if self._odom_stamps and stamp_ns <= self._odom_stamps[-1]:
            return False                                   # out of order or repeated: odometry is a chain
        self._odom_stamps.append(int(stamp_ns))
        self._odom_poses.append(odom)
        s = self.settings
        if not self.keyframes:
            self._add_keyframe(stamp_ns, odom, odom,
                               gtsam.PriorFactorPose3(X(0), odom, gtsam.noiseModel.Diagonal.Sigmas(
                                   diagonal_sigmas(s.start_sigma_m, s.start_sigma_rad))))
        else:
            last = self.keyframes[-1]
            delta = last.odom.between(odom)
            dist = float(np.linalg.norm(delta.translation()))
            angle = float(np.linalg.norm(gtsam.Rot3.Logmap(delta.rotation())))
            if dist < s.keyframe_distance_m and angle < s.keyframe_angle_rad:
                self._retry_pending()
                return False
            sigmas = diagonal_sigmas(max(s.odom_min_sigma_m, s.odom_sigma_m_per_m * dist),
                                     max(s.odom_min_sigma_rad, s.odom_sigma_rad_per_m * dist))
            i = len(self.keyframes)
            guess = self._estimate.atPose3(X(i - 1)).compose(delta)    # dead reckoning from the corrected pose
            self._add_keyframe(stamp_ns, odom, guess, gtsam.BetweenFactorPose3(
                X(i - 1), X(i), delta, gtsam.noiseModel.Diagonal.Sigmas(sigmas)))
        self._retry_pending()
        return True

    def add_loop_closure(self, c: LoopConstraint) -> bool:
        """Add one accepted closure; False if it cannot be used (logged) or must wait for odometry (kept)."""
        if not self.keyframes or c.query_stamp_ns > self._odom_stamps[-1] + self._tolerance_ns():
            self.pending.append(c)                         # the closure overtook the odometry of its frame
            return False
        query = self._attach(c.query_stamp_ns)
        if query is None:
            return self._reject(c, 'no odometry at the query stamp')
        kq, dq = query
        z, cov = closure_measurement(c, self.settings)
        noise = robust_noise(cov, self.settings)
        match = self._attach(c.match_stamp_ns) if c.match_stamp_ns >= self.keyframes[0].stamp_ns else None
        if match is not None and match[0] != kq:
            # seen earlier in this session: X(km) D_m Z = X(kq) D_q, so X(km)^-1 X(kq) = D_m Z D_q^-1
            km, dm = match
            factor = gtsam.BetweenFactorPose3(X(km), X(kq), dm.compose(z).compose(dq.inverse()), noise)
        elif c.place_pose is not None:
            # a place of a prior map: its pose is a variable held by a tight prior: L Z = X(kq) D_q
            if c.match_place_id not in self.places:
                s = self.settings
                place = to_pose3(c.place_pose)
                self._new_factors.add(gtsam.PriorFactorPose3(L(c.match_place_id), place, gtsam.noiseModel.Diagonal
                                                             .Sigmas(diagonal_sigmas(s.map_sigma_m, s.map_sigma_rad))))
                self._new_values.insert(L(c.match_place_id), place)
                self._estimate.insert(L(c.match_place_id), place)
                self.places.add(c.match_place_id)
            factor = gtsam.BetweenFactorPose3(L(c.match_place_id), X(kq), z.compose(dq.inverse()), noise)
        else:
            return self._reject(c, 'the matched place has no pose and is not in this session')
        self._new_factors.add(factor)
        self.closures.append(ClosureRecord(c, factor, noise))
        self._closure_added = True
        return True

    # solving ------------------------------------------------------------------------------------------------------
    def optimise(self, extra_iterations: int = 2) -> None:
        """Fold the new factors into iSAM2; a few extra updates let relinearisation settle after a loop closure."""
        if self._new_factors.size() == 0 and self._new_values.size() == 0:
            return
        self.isam.update(self._new_factors, self._new_values)
        for _ in range(extra_iterations if self._closure_added else 0):
            self.isam.update()
        self._new_factors = gtsam.NonlinearFactorGraph()
        self._new_values = gtsam.Values()
        self._closure_added = False
        self._estimate = self.isam.calculateEstimate()

    # outputs ------------------------------------------------------------------------------------------------------
    def trajectory(self, frame_id: str = 'map') -> Trajectory:
        """The keyframes' current estimates (call optimise() first for the latest)."""
        return Trajectory.from_poses([(k.stamp_ns, from_pose3(self._estimate.atPose3(X(i)), frame_id))
                                      for i, k in enumerate(self.keyframes)])

    def latest_pose(self) -> tuple[int, Pose, np.ndarray] | None:
        """(stamp, map-frame pose, 6x6 covariance in ROS order) at the newest odometry sample, or None."""
        if not self.keyframes:
            return None
        i = len(self.keyframes) - 1
        last = self.keyframes[-1]
        pose = self._estimate.atPose3(X(i)).compose(last.odom.between(self._odom_poses[-1]))
        try:
            cov = covariance_gtsam_to_ros(self.isam.marginalCovariance(X(i)))
        except RuntimeError:            # not yet in iSAM2 (optimise() not called since this keyframe)
            cov = np.zeros((6, 6))
        return self._odom_stamps[-1], from_pose3(pose), cov

    def closure_weights(self) -> list[float]:
        """Robust weight in [0, 1] of every closure at the current estimate (about 0: treated as an outlier)."""
        weights = []
        for rec in self.closures:
            if not isinstance(rec.noise, gtsam.noiseModel.Robust):
                weights.append(1.0)
                continue
            try:
                error = rec.factor.unwhitenedError(self._estimate)
            except RuntimeError:      # added but not optimised yet
                continue
            whitened = rec.noise.noise().whiten(error)
            weights.append(float(rec.noise.robust().weight(float(np.linalg.norm(whitened)))))
        return weights

    # internals ----------------------------------------------------------------------------------------------------
    def _add_keyframe(self, stamp_ns: int, odom: gtsam.Pose3, guess: gtsam.Pose3, factor) -> None:
        i = len(self.keyframes)
        self.keyframes.append(Keyframe(int(stamp_ns), odom))
        self._new_factors.add(factor)
        self._new_values.insert(X(i), guess)
        self._estimate.insert(X(i), guess)

    def _tolerance_ns(self) -> int:
        return int(self.settings.sync_tolerance_s * _NS)

    def _attach(self, stamp_ns: int) -> tuple[int, gtsam.Pose3] | None:
        """(nearest keyframe index, odometry offset keyframe -> stamp) or None without odometry near the stamp."""
        near = nearest_index(self._odom_stamps, stamp_ns, self._tolerance_ns())
        if near is None:
            return None
        best = nearest_index([k.stamp_ns for k in self.keyframes], stamp_ns)
        return best, self.keyframes[best].odom.between(self._odom_poses[near])

    def _retry_pending(self) -> None:
        waiting, self.pending = self.pending, []
        for c in waiting:
            self.add_loop_closure(c)

    def _reject(self, c: LoopConstraint, why: str) -> bool:
        self.rejected += 1
        log.warning('loop closure query t=%.3f -> place %d not used: %s', c.query_stamp_ns / _NS,
                    c.match_place_id, why)
        return False


def replay(odometry: list[tuple[int, Pose]], closures: list[LoopConstraint],
           settings: PoseGraphSettings = PoseGraphSettings()) -> LoopPoseGraph:
    """The graph the node builds, offline: odometry and closures fed in stamp order (a closure right after the
    odometry of its query frame, as it arrives live), optimised after each closure and once at the end."""
    graph = LoopPoseGraph(settings)
    by_stamp = sorted(closures, key=lambda c: c.query_stamp_ns)
    j = 0
    for stamp_ns, pose in sorted(odometry, key=lambda sp: sp[0]):
        graph.add_odometry(stamp_ns, pose)
        while j < len(by_stamp) and by_stamp[j].query_stamp_ns <= stamp_ns:
            graph.add_loop_closure(by_stamp[j])
            graph.optimise()
            j += 1
    for c in by_stamp[j:]:
        graph.add_loop_closure(c)
    graph.optimise()
    return graph

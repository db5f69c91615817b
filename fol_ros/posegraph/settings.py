"""Settings of the loop-closure pose graph (`fol-ros-posegraph` declares one ROS parameter per field)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from fol_ros.errors import ConfigError

ROBUST_KERNELS = ('dcs', 'cauchy', 'huber', 'none')


@dataclass(frozen=True)
class PoseGraphSettings:
    """How odometry and loop closures become factors. Sigmas are standard deviations (metres, radians).

    Attributes:
        keyframe_distance_m: a new graph pose when the odometry moved this far since the last one ...
        keyframe_angle_rad: ... or turned this much (other odometry samples only move the latest pose estimate).
        odom_sigma_m_per_m, odom_sigma_rad_per_m: odometry noise per metre travelled between two graph poses
            (wheel/visual odometry drifts with distance: a few percent, a fraction of a degree per metre).
        odom_min_sigma_m, odom_min_sigma_rad: floor of those sigmas (a robot turning on the spot still drifts).
        start_sigma_m, start_sigma_rad: prior on the first pose, which starts at the first odometry pose: the odometry
            frame must coincide with the map frame at start (e.g. the robot starts where the map's run started, or
            odometry was initialised from a relocalisation); a loop closure far from that is treated as an outlier.
        place_spacing_m: translation sigma of a closure without a relative pose: the query is somewhere near the
            matched place, about one place spacing of the map (keyframe distance) away.
        place_sigma_rad: rotation sigma of such a closure (the same place is recognised under a similar heading).
        map_sigma_m, map_sigma_rad: uncertainty of a prior map's place poses (they are fixed, surveyed or optimised).
        robust_kernel: 'dcs' (dynamic covariance scaling, default), 'cauchy', 'huber' or 'none' on every loop
            closure factor (odometry factors stay Gaussian); see fol_ros/posegraph/graph.py for why DCS.
        robust_parameter: the kernel's constant in whitened units (DCS: Phi; Cauchy/Huber: k).
        camera_in_body: pose of the camera in the odometry's body frame, (x, y, z, qx, qy, qz, qw); a LoopClosure's
            relative pose is expressed in camera frames and is moved to body frames with it.
        sync_tolerance_s: a closure's query stamp must be this close to an odometry sample, else it waits for one.
    """

    keyframe_distance_m: float = 0.5
    keyframe_angle_rad: float = 0.2
    odom_sigma_m_per_m: float = 0.05
    odom_sigma_rad_per_m: float = 0.01
    odom_min_sigma_m: float = 0.01
    odom_min_sigma_rad: float = 0.002
    start_sigma_m: float = 1.0
    start_sigma_rad: float = 0.1
    place_spacing_m: float = 1.0
    place_sigma_rad: float = 0.3
    map_sigma_m: float = 0.05
    map_sigma_rad: float = 0.01
    robust_kernel: str = 'dcs'
    robust_parameter: float = 1.0
    camera_in_body: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    sync_tolerance_s: float = 0.25

    def __post_init__(self) -> None:
        if self.robust_kernel not in ROBUST_KERNELS:
            raise ConfigError(f'robust_kernel={self.robust_kernel!r} must be one of {", ".join(ROBUST_KERNELS)}')
        if len(self.camera_in_body) != 7:
            raise ConfigError('camera_in_body needs 7 numbers: x, y, z, qx, qy, qz, qw')
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not value > 0 and f.name not in ('keyframe_distance_m',
                                                                             'keyframe_angle_rad'):
                raise ConfigError(f'{f.name}={value} must be > 0')
            if isinstance(value, float) and value < 0:
                raise ConfigError(f'{f.name}={value} must be >= 0')

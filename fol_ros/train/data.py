"""Training places: P places × K images per batch, laid out place-major (fol-method §10).

Sources of places:
  * `gsv_cities_places`: the GSV-Cities layout, `Dataframes/<city>.csv` + `Images/<city>/<name>.jpg` (the paper's
    training set): places with >= 4 images, each contributing its 4 most recent images (or a random 4).
  * `folder_places`: one sub-folder per place; or, for a flat folder of photos, each photo is a place whose
    views are synthetic (see augment.py).
  * `pose_places`: frames with positions (e.g. a rosbag with poses), clustered on a grid of `cell_m` metres.
A place with fewer than K images can be filled with synthetic views of its own images (`fill_views`).
"""
from __future__ import annotations

import csv
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from fol_ros.errors import BadInputError, ConfigError
from fol_ros.train.augment import augment_view

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
TRANSFORMS = ('test', 'official')
ImageRef = Union[Path, np.ndarray]


@dataclass
class Place:
    """One place: its label and its images, most preferred first (e.g. most recent)."""

    label: int
    images: list[ImageRef]
    name: str = ''


def read_rgb(ref: ImageRef) -> np.ndarray:
    """An RGB uint8 image from a path or an in-memory array."""
    if isinstance(ref, np.ndarray):
        return ref
    bgr = cv2.imread(str(ref), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BadInputError(f'{ref}: cannot decode the image (missing, empty or not an image file)')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def gsv_cities_places(root: str | Path, cities: Sequence[str] = (), min_images: int = 4, per_place: int = 4,
                      random_sample: bool = False, seed: int = 0) -> list[Place]:
    """Places of a GSV-Cities folder.

    Args:
        root: folder holding `Dataframes/` and `Images/`.
        cities: city names (CSV stems); empty = every CSV in Dataframes/.
        min_images: places with fewer images are skipped (4 in the paper).
        per_place: images kept per place: the most recent (year, month, lat descending) unless random_sample.
    """
    root = Path(root).expanduser()
    frames = root / 'Dataframes'
    if not frames.is_dir() or not (root / 'Images').is_dir():
        raise ConfigError(f'{root} is not a GSV-Cities folder: expected Dataframes/<city>.csv and Images/<city>/')
    names = list(cities) or sorted(p.stem for p in frames.glob('*.csv'))
    rng = random.Random(seed)
    places: list[Place] = []
    for ci, city in enumerate(names):
        path = frames / f'{city}.csv'
        if not path.is_file():
            available = ', '.join(sorted(p.stem for p in frames.glob('*.csv')))
            raise ConfigError(f'GSV-Cities: no {path}; available: {available}')
        groups: dict[int, list[dict]] = {}
        with open(path, newline='') as fh:
            for row in csv.DictReader(fh):
                groups.setdefault(int(row['place_id']), []).append(row)
        city_places = []
        for pid, rows in groups.items():
            if len(rows) < min_images:
                continue
            if random_sample:
                rows = rng.sample(rows, min(per_place, len(rows)))
            else:
                rows = sorted(rows, key=lambda r: (int(r['year']), int(r['month']), float(r['lat'])),
                              reverse=True)[:per_place]
            city_places.append(Place(label=pid + ci * 10 ** 5, name=f'{city}/{pid}',
                                     images=[root / 'Images' / r['city_id'] / gsv_image_name(r) for r in rows]))
        rng.shuffle(city_places)   # the official loader shuffles each city's table once
        places += city_places
        log.info('GSV-Cities %s: %d places with >= %d images', city, len(city_places), min_images)
    return places


def gsv_image_name(row: dict) -> str:
    """GSV-Cities file name of a CSV row: city_placeid(7)_year(4)_month(2)_northdeg(3)_lat_lon_panoid.jpg."""
    lat, lon = str(float(row['lat'])), str(float(row['lon']))   # as pandas prints the floats
    return (f"{row['city_id']}_{int(row['place_id']) % 10 ** 5:07d}_{int(row['year']):04d}_{int(row['month']):02d}_"
            f"{int(row['northdeg']):03d}_{lat}_{lon}_{row['panoid']}.jpg")


def folder_places(root: str | Path, min_images: int = 1) -> list[Place]:
    """One sub-folder per place (its images sorted by name); a flat folder of photos gives one place per photo."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f'places folder {root} does not exist')
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:
        places = [Place(i, list(_images_in(d)), d.name) for i, d in enumerate(subdirs)]
    else:
        places = [Place(i, [p], p.stem) for i, p in enumerate(_images_in(root))]
    places = [p for p in places if len(p.images) >= min_images]
    if not places:
        raise ConfigError(f'{root}: no places with >= {min_images} images (one sub-folder per place, or a folder '
                          f'of photos; suffixes {", ".join(IMAGE_SUFFIXES)})')
    return places


def pose_places(images: Sequence[ImageRef], positions: np.ndarray, cell_m: float = 5.0,
                min_images: int = 2) -> list[Place]:
    """Places from posed frames (a rosbag with poses): frames in the same `cell_m` grid cell share a place.

    positions: [N, 2] or [N, 3] metres (only x, y are used). Frames within a cell keep their time order.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if len(images) != len(positions):
        raise BadInputError(f'{len(images)} frames but {len(positions)} positions')
    if cell_m <= 0:
        raise ConfigError(f'cell_m={cell_m} must be > 0')
    cells: dict[tuple[int, int], list[int]] = {}
    for i, xy in enumerate(positions[:, :2]):
        cells.setdefault(tuple(np.floor(xy / cell_m).astype(int).tolist()), []).append(i)
    members = [m for m in cells.values() if len(m) >= min_images]
    return [Place(k, [images[i] for i in m], f'cell{k}') for k, m in enumerate(members)]


def rosbag_places(bag: str | Path, image_topic: str, pose_topic: str, cell_m: float = 5.0,
                  min_images: int = 2, stride: int = 1) -> list[Place]:
    """Places from a rosbag2 with camera images and poses (fol_ros.sources): frames clustered on a grid of
    `cell_m` metres; frames without a pose within the sources' tolerance are skipped. Images stay in memory."""
    from fol_ros.sources import read_bag_frames

    if not image_topic or not pose_topic:
        raise ConfigError('a rosbag training source needs image_topic and pose_topic (places come from poses)')
    images, xy = [], []
    for i, frame in enumerate(read_bag_frames(bag, image_topic, pose_topic)):
        if i % stride or frame.pose is None:
            continue
        images.append(frame.image)
        xy.append(frame.pose.position[:2])
    if not images:
        raise ConfigError(f'{bag}: no frames of {image_topic} with a pose from {pose_topic}')
    places = pose_places(images, np.asarray(xy), cell_m, min_images)
    log.info('%s: %d posed frames -> %d places of >= %d frames (cell %.1f m)', bag, len(images), len(places),
             min_images, cell_m)
    return places


def train_tensor(rgb: np.ndarray, size: tuple[int, int], transform: str = 'test') -> torch.Tensor:
    """[3, H, W] float32 network input.

    'test' = the evaluation transform (ImageNet-normalised, fol_ros.preprocess), so training matches inference;
    'official' = FoL's GSV transform (antialiased resize, values in [0, 1], no normalisation; §8, §14 #12).
    """
    if transform == 'test':
        from fol_ros.preprocess import preprocess
        return preprocess([rgb], size)[0]
    if transform == 'official':
        from PIL import Image
        img = Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()).float().div(255.0)
    raise ConfigError(f'transform={transform!r} is not one of {", ".join(TRANSFORMS)}')


class PlacesDataset(Dataset):
    """Item i = K images of place i as ([K, 3, H, W], [K] labels); see `collate_places` for P × K batches.

    Args:
        places: the places; those with fewer than K images are filled with synthetic views when
            `fill_views` (otherwise they are dropped).
        k: images per place (4 in the paper).
        size: network input (H, W).
        random_sample: draw K of a place's images at random each time instead of the first K.
        view_strength: strength of the synthetic views (augment.py).
        epoch_views: re-draw synthetic views every epoch (call `set_epoch`); off = fixed views, cacheable.
    """

    def __init__(self, places: Sequence[Place], k: int = 4, size: tuple[int, int] = (322, 322),
                 transform: str = 'test', random_sample: bool = False, fill_views: bool = True,
                 view_strength: float = 1.0, epoch_views: bool = False, seed: int = 0,
                 loader: Callable[[ImageRef], np.ndarray] = read_rgb) -> None:
        if k < 2:
            raise ConfigError(f'images per place k={k} must be >= 2 (the losses need positives)')
        if transform not in TRANSFORMS:
            raise ConfigError(f'transform={transform!r} is not one of {", ".join(TRANSFORMS)}')
        kept = [p for p in places if p.images and (fill_views or len(p.images) >= k)]
        if len(kept) < 2:
            raise ConfigError(f'{len(kept)} usable places; training needs >= 2 (negatives)')
        self.places, self.k, self.size, self.transform = kept, k, tuple(size), transform
        self.random_sample, self.view_strength, self.epoch_views = random_sample, view_strength, epoch_views
        self.seed, self.epoch, self.loader = seed, 0, loader

    def __len__(self) -> int:
        return len(self.places)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def image_rgb(self, index: int, view: int) -> np.ndarray:
        """The RGB image of view `view` of place `index` (a real image, or a synthetic view of one)."""
        place = self.places[index]
        refs = place.images
        if self.random_sample and len(refs) > self.k:
            refs = random.Random(hash((self.seed, self.epoch, index))).sample(refs, self.k)
        if view < len(refs):
            return self.loader(refs[view])
        base = self.loader(refs[view % len(refs)])
        salt = self.epoch if self.epoch_views else 0
        return augment_view(base, seed=hash((self.seed, salt, index, view)) & 0x7FFFFFFF,
                            strength=self.view_strength)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        imgs = [train_tensor(self.image_rgb(index, v), self.size, self.transform) for v in range(self.k)]
        return torch.stack(imgs), torch.full((self.k,), self.places[index].label, dtype=torch.long)


def collate_places(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """P items of K images -> ([P*K, 3, H, W], [P*K]) place-major, as the official GSV-Cities loader."""
    return torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])

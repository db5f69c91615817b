"""Geometric verification: a real pair with a known homography, warped pairs, synthetic 3D scenes."""
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np
import pytest

from fol_ros.config import VerifyConfig
from fol_ros.verify.geometry import camera_matrix, rotation_angle_deg, verify_pair, verify_tokens

OPENCV_DATA = Path('/usr/share/doc/opencv-doc/examples/data')


def _apply_h(h, pts):
    p = np.c_[pts, np.ones(len(pts))] @ np.asarray(h).T
    return p[:, :2] / p[:, 2:]


def _read_h(path):
    """The 3x3 matrix of an OpenCV XML file (parsed directly: OpenCV 5's FileStorage rejects this old file)."""
    data = ElementTree.parse(path).getroot().find('H13/data').text
    return np.array([float(v) for v in data.split()]).reshape(3, 3)


def _sift_matches(img1, img2, ratio=0.8):
    sift = cv2.SIFT_create(nfeatures=1500)
    k1, d1 = sift.detectAndCompute(img1, None)
    k2, d2 = sift.detectAndCompute(img2, None)
    good = [m for m, n in cv2.BFMatcher().knnMatch(d1, d2, k=2) if m.distance < ratio * n.distance]
    return (np.float32([k1[m.queryIdx].pt for m in good]), np.float32([k2[m.trainIdx].pt for m in good]))


def _corner_error(h_est, h_true, w, h):
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    return np.abs(_apply_h(h_est, corners) - _apply_h(h_true, corners)).max()


def test_graf1_graf3_homography_matches_ground_truth():
    if not (OPENCV_DATA / 'graf1.png').exists():
        pytest.skip(f'{OPENCV_DATA}/graf1.png missing: install the Debian package opencv-doc')
    img1 = cv2.imread(str(OPENCV_DATA / 'graf1.png'), cv2.IMREAD_GRAYSCALE)
    img3 = cv2.imread(str(OPENCV_DATA / 'graf3.png'), cv2.IMREAD_GRAYSCALE)
    h_true = _read_h(OPENCV_DATA / 'H1to3p.xml')
    p1, p3 = _sift_matches(img1, img3)
    res = verify_pair(p1, p3, VerifyConfig(method='homography', ransac_threshold_px=3.0, max_iters=5000))
    assert res.num_inliers >= 50, res
    gt_err = np.linalg.norm(_apply_h(h_true, p1[res.inliers]) - p3[res.inliers], axis=1)
    # SIFT keypoints under this strong viewpoint change are only accurate to a few pixels (the ground truth
    # itself fits 247 of 433 matches within 3 px), hence the tolerances.
    assert np.median(gt_err) < 2.0 and np.mean(gt_err < 5.0) > 0.75
    assert _corner_error(res.model, h_true, img1.shape[1], img1.shape[0]) < 15.0
    all_err = np.linalg.norm(_apply_h(h_true, p1) - p3, axis=1)
    assert res.inliers[all_err < 2.0].mean() > 0.9       # the truly consistent matches are kept


def _texture(rng, size=400):
    img = np.zeros((size, size), np.uint8)
    for _ in range(250):
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(img, c, int(rng.integers(3, 25)), int(rng.integers(40, 255)), -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def test_warped_image_recovers_known_homography():
    rng = np.random.default_rng(0)
    img = _texture(rng)
    h_true = np.array([[0.9, 0.1, 20.0], [-0.08, 1.05, 10.0], [2e-4, 1e-4, 1.0]])
    warped = cv2.warpPerspective(img, h_true, (400, 400))
    p1, p2 = _sift_matches(img, warped)
    res = verify_pair(p1, p2, VerifyConfig(method='homography', ransac_threshold_px=2.0))
    assert res.num_inliers >= 30
    assert _corner_error(res.model, h_true, 400, 400) < 4.0


def test_synthetic_homography_separates_inliers_from_outliers():
    rng = np.random.default_rng(1)
    h_true = np.array([[1.1, 0.05, -15.0], [0.02, 0.95, 8.0], [1e-4, -5e-5, 1.0]])
    p1 = rng.uniform(0, 640, (200, 2))
    p2 = _apply_h(h_true, p1) + rng.normal(0, 0.5, (200, 2))
    outlier = rng.random(200) < 0.3
    p2[outlier] = rng.uniform(0, 640, (outlier.sum(), 2))
    res = verify_pair(p1, p2, VerifyConfig(method='homography', ransac_threshold_px=3.0))
    assert np.mean(res.inliers == ~outlier) > 0.97
    fund = verify_pair(p1, p2, VerifyConfig(method='fundamental', ransac_threshold_px=3.0))
    assert fund.model.shape == (3, 3) and fund.inliers[~outlier].mean() > 0.95


def _scene(rng, r_true, t_true, k, n=300, noise=0.3, outliers=0.25):
    pts = np.c_[rng.uniform(-4, 4, n), rng.uniform(-3, 3, n), rng.uniform(6, 15, n)]
    cam2 = pts @ r_true.T + t_true
    proj = lambda x: (x[:, :2] / x[:, 2:]) * [k[0, 0], k[1, 1]] + [k[0, 2], k[1, 2]]  # noqa: E731
    p1, p2 = proj(pts) + rng.normal(0, noise, (n, 2)), proj(cam2) + rng.normal(0, noise, (n, 2))
    bad = rng.random(n) < outliers
    p2[bad] = rng.uniform(0, 640, (bad.sum(), 2))
    return p1, p2, bad


def test_essential_recovers_rotation_and_translation_direction():
    rng = np.random.default_rng(2)
    r_true = cv2.Rodrigues(np.array([0.05, -0.2, 0.03]))[0]
    t_true = np.array([0.8, 0.1, 0.3])
    intr = (500.0, 500.0, 320.0, 240.0)
    p1, p2, bad = _scene(rng, r_true, t_true, camera_matrix(intr))
    res = verify_pair(p1, p2, VerifyConfig(method='essential', intrinsics=intr, ransac_threshold_px=1.0,
                                           max_iters=5000))
    rel = res.relative_pose
    assert rel is not None and not rel.scale_known
    assert rotation_angle_deg(np.reshape(rel.rotation, (3, 3)), r_true) < 1.0
    t = np.array(rel.translation)
    assert abs(np.linalg.norm(t) - 1) < 1e-6
    assert np.degrees(np.arccos(np.clip(t @ t_true / np.linalg.norm(t_true), -1, 1))) < 3.0
    assert res.inliers[~bad].mean() > 0.9 and res.inliers[bad].mean() < 0.1


def test_too_few_matches_and_none_method():
    cfg = VerifyConfig(method='fundamental', min_matches=8)
    res = verify_pair(np.zeros((5, 2)), np.zeros((5, 2)), cfg)
    assert res.num_inliers == 0 and '5 matches' in res.reason and res.model is None
    assert verify_pair(np.zeros((3, 2)), np.zeros((3, 2)), VerifyConfig(method='none')).num_inliers == 3
    degenerate = verify_pair(np.zeros((20, 2)), np.zeros((20, 2)), VerifyConfig(method='homography'))
    assert degenerate.num_inliers == 0 and degenerate.reason


def test_verify_tokens_uses_mutual_nn_pairs():
    rng = np.random.default_rng(4)
    tok = rng.normal(size=(60, 16)).astype(np.float32)
    tok /= np.linalg.norm(tok, axis=1, keepdims=True)
    xy = rng.uniform(0, 320, (60, 2)).astype(np.float32)
    h_true = np.array([[1.0, 0.0, 12.0], [0.0, 1.0, -7.0], [0.0, 0.0, 1.0]])
    perm = rng.permutation(60)
    res, iq, ic = verify_tokens(tok, xy, tok[perm], _apply_h(h_true, xy[perm]),
                                VerifyConfig(method='homography', ransac_threshold_px=1.0))
    assert len(iq) == 60 and np.array_equal(perm[ic], iq)
    assert res.num_inliers == 60 and _corner_error(res.model, h_true, 320, 320) < 0.5

"""Synthetic views of a photograph: viewpoint (perspective, crop, roll) and photometric (light, colour, blur, noise,
JPEG) changes. They turn any photo collection into places with K views each, and fill places that have fewer than
K real images. Every view is reproducible from its seed.
"""
from __future__ import annotations

import cv2
import numpy as np


def augment_view(rgb: np.ndarray, seed: int, strength: float = 1.0) -> np.ndarray:
    """One random view of an RGB uint8 image, same size as the input; `strength` scales every change (0 = copy)."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    s = float(strength)
    # Viewpoint: jitter the four corners (perspective + crop + roll) and warp back onto the full frame.
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    inset = rng.uniform(0.0, 0.15 * s, size=(4, 2)) * [w, h]
    src = src + np.float32(inset * [[1, 1], [-1, 1], [-1, -1], [1, -1]])
    angle = np.deg2rad(rng.uniform(-6, 6) * s)
    centre = src.mean(0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=np.float32)
    src = (src - centre) @ rot.T + centre
    dst = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    out = cv2.warpPerspective(rgb, cv2.getPerspectiveTransform(np.float32(src), dst), (w, h),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # Light: gamma (darker/brighter), gain, contrast and a colour cast.
    x = out.astype(np.float32) / 255.0
    x = np.power(x, np.exp(rng.uniform(-0.5, 0.7) * s))
    x = (x - x.mean()) * (1 + rng.uniform(-0.3, 0.3) * s) + x.mean()
    x = x * (1 + rng.uniform(-0.4, 0.2) * s) * (1 + rng.uniform(-0.1, 0.1, size=3) * s)
    if rng.random() < 0.3 * s:
        k = int(rng.choice([3, 5]))
        x = cv2.GaussianBlur(x, (k, k), 0)
    x = x + rng.normal(0, rng.uniform(0, 0.03) * s, size=x.shape)
    out = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if s > 0:
        ok, buf = cv2.imencode('.jpg', out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 95))])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(out)

"""FoL's evaluation transform (fol-method §8): ToTensor, ImageNet Normalize, then a bilinear resize of the
*normalised* tensor without antialiasing and without keeping the aspect ratio (torchvision 0.15 behaviour).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fol_ros.config import check_input_size
from fol_ros.errors import BadInputError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLORS = ('rgb', 'bgr')


def _as_rgb_uint8(image: np.ndarray, color: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise BadInputError(f'expected a numpy array, got {type(image).__name__}')
    if image.dtype != np.uint8:
        raise BadInputError(f'dtype {image.dtype}, expected uint8 (0..255); convert with .astype(np.uint8)')
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise BadInputError(f'shape {image.shape}, expected H x W x 3 (or H x W grayscale)')
    if image.shape[2] == 1:           # PIL's convert('RGB') replicates gray
        return np.repeat(image, 3, axis=2)
    image = image[:, :, :3]           # PIL's convert('RGB') drops alpha
    return image[:, :, ::-1] if color == 'bgr' else image


def to_normalized_tensor(image: np.ndarray, color: str = 'rgb') -> torch.Tensor:
    """uint8 H x W x 3 -> float32 [3, H, W], ToTensor then ImageNet Normalize (sub then div, as torchvision)."""
    if color not in COLORS:
        raise BadInputError(f"color={color!r}: use 'rgb' or 'bgr'")
    rgb = _as_rgb_uint8(image, color)
    t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return t.sub(mean).div(std)


def preprocess(images: Sequence[np.ndarray], size: tuple[int, int] | int = (322, 322),
               color: str = 'rgb') -> torch.Tensor:
    """Official test transform of a batch of uint8 images of any size.

    Args:
        images: H x W x 3 uint8 arrays (RGB or BGR; grayscale H x W accepted), sizes may differ.
        size: network input (H, W) or S for S x S; multiples of 14, >= 294.
        color: channel order of the inputs, 'rgb' or 'bgr'.
    Returns:
        float32 tensor [B, 3, H, W].
    """
    if isinstance(size, int):
        size = (size, size)
    try:
        size = check_input_size(size)
    except ConfigError as exc:
        raise BadInputError(str(exc)) from None
    if len(images) == 0:
        raise BadInputError('no images to preprocess')
    out = torch.empty(len(images), 3, size[0], size[1], dtype=torch.float32)
    for i, image in enumerate(images):
        try:
            t = to_normalized_tensor(image, color)
        except BadInputError as exc:
            raise BadInputError(f'image {i}: {exc}') from None
        if tuple(t.shape[1:]) == size:
            out[i] = t
        else:
            out[i] = F.interpolate(t[None], size=size, mode='bilinear', align_corners=False, antialias=False)[0]
    return out

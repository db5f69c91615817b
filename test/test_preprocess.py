"""The official test transform: ToTensor, ImageNet Normalize, then bilinear resize without antialias (§8)."""
import numpy as np
import pytest
import torch

from fol_ros.errors import BadInputError
from fol_ros.preprocess import preprocess


def _reference(image: np.ndarray, size) -> torch.Tensor:
    """Written from the spec, in float64 where it does not matter, step by step."""
    t = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1) / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    t = (t - mean) / std
    return torch.nn.functional.interpolate(t[None], size=size, mode='bilinear', align_corners=False,
                                           antialias=False)[0]


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), rng.integers(0, 256, (700, 500, 3), dtype=np.uint8)]


def test_matches_reference_any_size(images):
    out = preprocess(images, (322, 322))
    assert out.shape == (2, 3, 322, 322) and out.dtype == torch.float32
    for i, im in enumerate(images):
        torch.testing.assert_close(out[i], _reference(im, (322, 322)), rtol=0, atol=1e-6)


def test_non_square_and_int_size(images):
    assert preprocess(images, (294, 434)).shape == (2, 3, 294, 434)
    torch.testing.assert_close(preprocess(images, 504), preprocess(images, (504, 504)))


def test_bgr_and_grayscale(images):
    rgb = preprocess(images[:1], 322)
    torch.testing.assert_close(preprocess([images[0][:, :, ::-1].copy()], 322, color='bgr'), rgb)
    gray = images[0][:, :, 0]
    torch.testing.assert_close(preprocess([gray], 322), preprocess([np.stack([gray] * 3, -1)], 322))


def test_same_size_is_identity():
    im = np.random.default_rng(1).integers(0, 256, (322, 322, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess([im], 322)[0], _reference(im, (322, 322)), rtol=0, atol=1e-6)


def test_no_antialias():
    # Stripes "0 255 255 0" downscaled 4x: bilinear without antialias samples between columns 4d+1 and 4d+2 (both
    # 255); an antialiased resize would average the four columns to ~128.
    cols = np.where(np.arange(1288) % 4 % 3 == 0, 0, 255).astype(np.uint8)
    image = np.broadcast_to(cols[None, :, None], (1288, 1288, 3)).copy()
    out = preprocess([image], 322)
    white = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out[0].mean(dim=(1, 2)).numpy(), white, rtol=1e-5)


@pytest.mark.parametrize('bad,match', [
    (np.zeros((10, 10, 3), dtype=np.float32), 'uint8'),
    (np.zeros((10, 10, 2), dtype=np.uint8), 'shape'),
    (np.zeros((0, 10, 3), dtype=np.uint8), 'shape'),
    ('not an image', 'numpy'),
])
def test_bad_images(bad, match):
    with pytest.raises(BadInputError, match=f'image 0: .*{match}'):
        preprocess([bad], 322)


def test_bad_sizes_and_color(images):
    with pytest.raises(BadInputError, match='multiple of the ViT patch size 14'):
        preprocess(images, 320)
    with pytest.raises(BadInputError, match='294'):
        preprocess(images, 224)
    with pytest.raises(BadInputError, match='bgr'):
        preprocess(images, 322, color='hsv')
    with pytest.raises(BadInputError, match='no images'):
        preprocess([], 322)

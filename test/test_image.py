"""fol_ros.image: every accepted encoding gives the same RGB pixels; every bad input is a BadInputError."""
import cv2
import numpy as np
import pytest

from fol_ros.errors import BadInputError
from fol_ros.image import compressed_size, decode_compressed, decode_raw


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def _padded(pixels: np.ndarray, pad: int) -> tuple[bytes, int]:
    rows = pixels.reshape(pixels.shape[0], -1)
    step = rows.shape[1] + pad
    out = np.zeros((rows.shape[0], step), np.uint8)
    out[:, :rows.shape[1]] = rows
    return out.tobytes(), step


@pytest.mark.parametrize('pad', [0, 3])
@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_color_encodings_give_rgb(rgb, encoding, pad):
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    src = {'rgb8': rgb, 'bgr8': rgb[:, :, ::-1], 'rgba8': np.concatenate([rgb, alpha], 2),
           'bgra8': np.concatenate([rgb[:, :, ::-1], alpha], 2)}[encoding]
    data, step = _padded(np.ascontiguousarray(src), pad)
    out = decode_raw(data, 7, 5, encoding, step)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags['C_CONTIGUOUS']
    np.testing.assert_array_equal(out, rgb)
    out[0, 0, 0] ^= 1  # writable: it is a copy, not a view of the message buffer


def test_mono8_and_mono16():
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    out = decode_raw(gray.tobytes(), 7, 5, 'mono8', 7)
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, 2))
    wide = gray.astype(np.uint16) * 256 + 99
    little = decode_raw(wide.astype('<u2').tobytes(), 7, 5, 'mono16', 14)
    big = decode_raw(wide.astype('>u2').tobytes(), 7, 5, 'mono16', 14, is_bigendian=True)
    np.testing.assert_array_equal(little[:, :, 1], gray)
    np.testing.assert_array_equal(big, little)


def test_array_input(rgb):
    out = decode_raw(np.frombuffer(rgb.tobytes(), np.uint8), 7, 5, 'rgb8', 21)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('args, match', [
    (dict(encoding='yuv422'), 'not supported'),
    (dict(encoding='32FC1'), 'not supported'),
    (dict(width=0), 'zero size'),
    (dict(height=0, data=b''), 'zero size'),
    (dict(step=20), 'smaller than one row'),
    (dict(step=22), 'needs 110 bytes'),
    (dict(data=b'\0' * 104), 'needs 105 bytes'),
    (dict(width=100000, height=100000), 'above the limit'),
])
def test_raw_rejections(rgb, args, match):
    kwargs = dict(data=rgb.tobytes(), width=7, height=5, encoding='rgb8', step=21)
    kwargs.update(args)
    with pytest.raises(BadInputError, match=match):
        decode_raw(**kwargs)


@pytest.mark.parametrize('ext', ['.png', '.jpg'])
def test_compressed_round_trip(ext):
    rng = np.random.default_rng(1)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), (7, 7), 3)
    ok, enc = cv2.imencode(ext, rgb[:, :, ::-1])
    assert ok
    out = decode_compressed(enc.tobytes())
    assert out.shape == (48, 64, 3)
    tolerance = 0 if ext == '.png' else 12
    assert np.abs(out.astype(int) - rgb).mean() <= tolerance
    assert compressed_size(enc.tobytes())[:2] == (64, 48)


def test_compressed_rejections():
    ok, png = cv2.imencode('.png', np.zeros((40, 50, 3), np.uint8))
    ok, jpg = cv2.imencode('.jpg', np.zeros((40, 50, 3), np.uint8))
    png, jpg = png.tobytes(), jpg.tobytes()
    with pytest.raises(BadInputError, match='no data'):
        decode_compressed(b'')
    with pytest.raises(BadInputError, match='neither JPEG nor PNG'):
        decode_compressed(b'GIF89a' + b'\0' * 50)
    with pytest.raises(BadInputError, match='corrupt'):
        decode_compressed(jpg[:len(jpg) // 3])
    with pytest.raises(BadInputError, match='corrupt'):
        decode_compressed(png[:40] + b'\0' * 40)
    with pytest.raises(BadInputError, match='corrupt'):
        decode_compressed(png[:10])
    with pytest.raises(BadInputError, match='above the limit'):
        decode_compressed(png, max_pixels=1000)


def test_bomb_rejected_before_decoding():
    # A PNG header claiming 100000 x 100000 pixels: rejected from the header, nothing is allocated.
    ok, png = cv2.imencode('.png', np.zeros((4, 4, 3), np.uint8))
    forged = bytearray(png.tobytes())
    forged[16:24] = (100000).to_bytes(4, 'big') * 2
    with pytest.raises(BadInputError, match='above the limit'):
        decode_compressed(bytes(forged))

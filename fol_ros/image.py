"""Stage 1: raw image buffers and compressed bytes into an RGB uint8 array (H x W x 3).

The node uses this when cv_bridge is not installed (the pip environment) and for every compressed image.
Everything the pipeline cannot use is rejected with a `BadInputError` that names the problem, before any
large allocation: unsupported encodings, empty images, a buffer whose size disagrees with width/height/step,
corrupt compressed data and images above a pixel budget (a decompression bomb must not take the node down).
"""
from __future__ import annotations

import struct

import cv2
import numpy as np

# 8192 x 4096 is far above any camera the node serves; a bigger frame is almost surely a bug or an attack.
from fol_ros.config import DEFAULT_MAX_PIXELS
from fol_ros.errors import BadInputError

# encoding -> (channels, bytes per channel, cv2 conversion to RGB or None)
RAW_ENCODINGS: dict[str, tuple[int, int, int | None]] = {
    'rgb8': (3, 1, None),
    'bgr8': (3, 1, cv2.COLOR_BGR2RGB),
    'rgba8': (4, 1, cv2.COLOR_RGBA2RGB),
    'bgra8': (4, 1, cv2.COLOR_BGRA2RGB),
    'mono8': (1, 1, cv2.COLOR_GRAY2RGB),
    'mono16': (1, 2, cv2.COLOR_GRAY2RGB),
}

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_JPEG_MAGIC = b'\xff\xd8'
# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not SOFs.
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise BadInputError(f'image has zero size ({width}x{height}); the camera driver sent an empty frame')
    if width * height > max_pixels:
        raise BadInputError(f'image {width}x{height} has {width * height} pixels, above the limit of {max_pixels}; '
                            'resize it upstream or raise the max_image_pixels parameter')


def decode_raw(data: bytes | bytearray | memoryview | np.ndarray, width: int, height: int, encoding: str,
               step: int, *, is_bigendian: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Convert a sensor_msgs/Image-style buffer into RGB uint8.

    Args:
        data: the pixel buffer, `height` rows of `step` bytes.
        width, height: image size in pixels.
        encoding: one of RAW_ENCODINGS (rgb8, bgr8, rgba8, bgra8, mono8, mono16).
        step: bytes per row (>= width * bytes per pixel; larger when rows are padded).
        is_bigendian: byte order of mono16 samples.
        max_pixels: images with more pixels are rejected.

    Returns:
        A contiguous H x W x 3 uint8 array in RGB order (mono16 is scaled to 8 bits by its top byte).

    Raises:
        BadInputError: unsupported encoding, zero size, size above max_pixels, or step/buffer mismatch.
    """
    if encoding not in RAW_ENCODINGS:
        raise BadInputError(f'image encoding {encoding!r} is not supported; use one of '
                            f'{", ".join(RAW_ENCODINGS)} or a JPEG/PNG CompressedImage')
    width, height, step = int(width), int(height), int(step)
    _check_size(width, height, max_pixels)
    channels, depth, conversion = RAW_ENCODINGS[encoding]
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise BadInputError(f'{encoding} image {width}x{height}: step {step} is smaller than one row '
                            f'({row_bytes} bytes)')
    if isinstance(data, np.ndarray):
        buffer = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size != step * height:
        raise BadInputError(f'{encoding} image {width}x{height} with step {step} needs {step * height} bytes, '
                            f'got {buffer.size}')
    rows = buffer.reshape(height, step)[:, :row_bytes]
    if depth == 2:
        # The top byte of each 16-bit sample is its 8-bit value: exact scaling by 1/256 without a float pass.
        pixels = rows.reshape(height, width, 2)[:, :, 0 if is_bigendian else 1]
    else:
        pixels = rows.reshape(height, width, channels)
        if channels == 1:
            pixels = pixels[:, :, 0]
    if conversion is None:
        return np.array(pixels, dtype=np.uint8, order='C')  # a copy: the message buffer is read-only
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def compressed_size(data: bytes) -> tuple[int, int, str]:
    """Read (width, height, format) from a JPEG or PNG header without decoding the pixels.

    Raises:
        BadInputError: not JPEG or PNG, or a header too damaged to give a size.
    """
    if data[:8] == _PNG_MAGIC:
        if len(data) < 24 or data[12:16] != b'IHDR':
            raise BadInputError('corrupt PNG: missing IHDR header')
        width, height = struct.unpack('>II', data[16:24])
        return width, height, 'png'
    if data[:2] == _JPEG_MAGIC:
        return (*_jpeg_size(data), 'jpeg')
    raise BadInputError(f'compressed image is neither JPEG nor PNG (first bytes {bytes(data[:4]).hex()}); '
                        "only 'jpeg' and 'png' CompressedImage formats are supported")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise BadInputError(f'corrupt JPEG: expected a marker at byte {pos}')
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers have no length
            pos += 2
            continue
        length = struct.unpack('>H', data[pos + 2:pos + 4])[0]
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack('>HH', data[pos + 5:pos + 9])
            return width, height
        pos += 2 + length
    raise BadInputError('corrupt JPEG: no frame header with the image size')


def decode_compressed(data: bytes | bytearray | memoryview | np.ndarray, *,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode JPEG or PNG bytes (sensor_msgs/CompressedImage.data) into RGB uint8.

    The size is read from the header first, so an oversized image is rejected before it is decoded.

    Raises:
        BadInputError: empty data, not JPEG/PNG, corrupt data, zero size or more than max_pixels pixels.
    """
    raw = bytes(data) if not isinstance(data, bytes) else data
    if not raw:
        raise BadInputError('compressed image has no data')
    width, height, kind = compressed_size(raw)
    _check_size(width, height, max_pixels)
    decoded = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR)
    if decoded is None or decoded.shape[:2] != (height, width):
        raise BadInputError(f'corrupt {kind.upper()} data ({len(raw)} bytes): the decoder could not read it')
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)

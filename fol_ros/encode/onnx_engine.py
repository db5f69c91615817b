"""ONNX Runtime inference engine: the exported fixed-shape FoL graph (see export.py) behind the `Encoder` protocol.

Preprocessing and the conversion of the fixed-size outputs into `Encoding`s are shared with the torch engine
(`torch_engine.encode_in_batches`), so every back end returns the same records.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Sequence

import numpy as np
import torch

from fol_ros.encode.engine_cache import EngineCache
from fol_ros.encode.export import INPUT_NAME, cached_onnx, ort_session
from fol_ros.encode.torch_engine import encode_in_batches
from fol_ros.errors import EngineError
from fol_ros.records import Encoding, ModelInfo

LOG = logging.getLogger(__name__)


def onnxruntime_providers() -> list[str]:
    """Execution providers this onnxruntime build offers ([] when onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def providers_for(device: str) -> list:
    """ONNX Runtime providers for 'cpu' or 'cuda[:N]'; raises EngineError when CUDA is asked for but absent."""
    available = onnxruntime_providers()
    if not available:
        raise EngineError('onnxruntime is not installed: pip install onnxruntime==1.32.0 (or use engine=torch)')
    if device.startswith('cuda'):
        if 'CUDAExecutionProvider' not in available:
            raise EngineError(f'device={device} with engine=onnxruntime needs the onnxruntime-gpu build '
                              f'(this one offers {", ".join(available)}); use device=cpu or engine=torch')
        index = int(device.split(':')[1]) if ':' in device else 0
        return [('CUDAExecutionProvider', {'device_id': index}), 'CPUExecutionProvider']
    return ['CPUExecutionProvider']


class OnnxEncoder:
    """FoL descriptors from an exported ONNX graph with ONNX Runtime.

    Args:
        onnx_path: graph written by `export.export_onnx` for `info` (same weights and input size).
        info: model identity; `info.input_size` must equal the graph's input size.
        device: 'cpu' or 'cuda[:N]' (the latter needs onnxruntime-gpu).
        threads: intra-op threads, 0 = onnxruntime's default (one per physical core).
        max_batch: images per run.
    """

    def __init__(self, onnx_path: pathlib.Path | str, info: ModelInfo, device: str = 'cpu', threads: int = 0,
                 max_batch: int = 8) -> None:
        self.session = ort_session(onnx_path, providers_for(device), threads)
        shape = self.session.get_inputs()[0].shape          # ['batch', 3, H, W]
        if [int(v) for v in shape[2:]] != list(info.input_size):
            raise EngineError(f'{onnx_path} was exported for {shape[2]}x{shape[3]} but the model runs at '
                              f'{info.input_size[0]}x{info.input_size[1]}; re-export with fol-ros export onnx')
        self.info = info
        self.path = pathlib.Path(onnx_path)
        self.max_batch = max(1, int(max_batch))
        self.name = 'onnxruntime-' + ('cuda' if device.startswith('cuda') else 'cpu')

    def run(self, batch: torch.Tensor | np.ndarray) -> tuple[np.ndarray, ...]:
        """The graph on a preprocessed float32 batch [B,3,H,W]: (global, local, local_index, valid) as numpy."""
        x = batch.numpy() if isinstance(batch, torch.Tensor) else batch
        return tuple(self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}))

    def encode(self, images: Sequence[np.ndarray], color: str = 'rgb') -> list[Encoding]:
        """Encode uint8 images (RGB or BGR, any size) into one `Encoding` each."""
        return encode_in_batches(images, color, self.info, self.max_batch, self.run)


def onnx_encoder_from_net(net: torch.nn.Module, info: ModelInfo, cache: EngineCache, device: str = 'cpu',
                          threads: int = 0, max_batch: int = 8, verify: bool = True) -> OnnxEncoder:
    """Export `net` once into the cache (verified against torch) and open it with ONNX Runtime."""
    providers_for(device)    # fail on a missing onnxruntime before spending time on an export
    path = cached_onnx(net, info, cache, verify=verify)
    return OnnxEncoder(path, info, device=device, threads=threads, max_batch=max_batch)

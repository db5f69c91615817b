"""PyTorch inference engine: preprocess -> FoLNet.forward_fixed -> per-image `Encoding`s."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from fol_ros.errors import EngineError
from fol_ros.model.fol import FoLNet
from fol_ros.preprocess import preprocess
from fol_ros.records import Encoding, ModelInfo

log = logging.getLogger(__name__)

LOCAL_STRIDE_PX = 3.5   # local cell u sits at 3.5 * u + 7 px of the network input (fol-method §5)
LOCAL_OFFSET_PX = 7.0


def local_cell_xy(index: np.ndarray, grid_w: int, input_size: tuple[int, int],
                  image_size: tuple[int, int]) -> np.ndarray:
    """(x, y) pixel coordinates in the original image of flat local-grid indices; float32 [L, 2]."""
    rows, cols = np.divmod(index.astype(np.int64), grid_w)
    sx = image_size[1] / input_size[1]
    sy = image_size[0] / input_size[0]
    xy = np.empty((index.shape[0], 2), dtype=np.float32)
    xy[:, 0] = (LOCAL_STRIDE_PX * cols + LOCAL_OFFSET_PX) * sx
    xy[:, 1] = (LOCAL_STRIDE_PX * rows + LOCAL_OFFSET_PX) * sy
    return xy


class TorchEncoder:
    """FoL descriptors with PyTorch on CPU or CUDA.

    Args:
        net: the FoL network (put in eval mode here).
        info: model identity; `info.input_size` is the network input (H, W).
        device: 'cpu', 'cuda' or 'cuda:N'.
        precision: 'fp32', or 'fp16'/'bf16' autocast on CUDA; on the CPU 'bf16' autocasts to bf16 (opt-in: faster
            where the CPU has bf16 instructions, but it changes the token set, docs/engines.md) and anything else
            runs fp32 (fp16 has no fast CPU kernels).
        max_batch: images per forward pass.
    """

    def __init__(self, net: FoLNet, info: ModelInfo, device: str = 'cpu', precision: str = 'fp32',
                 max_batch: int = 8) -> None:
        if device.startswith('cuda') and not torch.cuda.is_available():
            raise EngineError(f'device {device!r} requested but torch sees no CUDA GPU; use device=cpu')
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.info = info
        self.max_batch = max(1, int(max_batch))
        self.autocast_dtype = None
        if self.device.type == 'cuda' and precision in ('fp16', 'bf16'):
            self.autocast_dtype = torch.float16 if precision == 'fp16' else torch.bfloat16
        elif self.device.type == 'cpu' and precision == 'bf16':
            self.autocast_dtype = torch.bfloat16
        self.name = f'torch-{self.device.type}' + (f'-{precision}' if self.autocast_dtype else '')

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """forward_fixed on a preprocessed batch [B,3,H,W] (moved to the device); outputs stay on the device."""
        batch = batch.to(self.device, non_blocking=True)
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.net.forward_fixed(batch)
        return self.net.forward_fixed(batch)

    def encode(self, images: Sequence[np.ndarray], color: str = 'rgb') -> list[Encoding]:
        """Encode uint8 images (RGB or BGR, any size) into one `Encoding` each."""
        return encode_in_batches(images, color, self.info, self.max_batch, self._run_numpy)

    def _run_numpy(self, batch: torch.Tensor) -> tuple[np.ndarray, ...]:
        return tuple(t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
                     for t in self.forward(batch))


def encode_in_batches(images: Sequence[np.ndarray], color: str, info: ModelInfo, max_batch: int,
                      run: Callable[[torch.Tensor], tuple[np.ndarray, ...]]) -> list[Encoding]:
    """Preprocess, run and convert to `Encoding`s in chunks of `max_batch`; shared by every back end.

    Args:
        run: preprocessed float32 CPU batch [B,3,H,W] -> numpy (global [B,8448], local [B,3600,128],
            local_index [B,3600] (int32 or int64), valid [B,3600] bool), i.e. forward_fixed's outputs.
    """
    if len(images) == 0:
        return []
    h, w = info.input_size
    grid = (4 * (h // 14) - 3, 4 * (w // 14) - 3)
    out: list[Encoding] = []
    for start in range(0, len(images), max_batch):
        chunk = images[start:start + max_batch]
        g, local, index, valid = run(preprocess(chunk, (h, w), color))
        for i, image in enumerate(chunk):
            n = int(valid[i].sum())
            idx = index[i, :n]
            if n == 0 or (idx < 0).any():
                raise EngineError(f'image {start + i}: the network returned {n} valid local tokens')
            image_size = (int(image.shape[0]), int(image.shape[1]))
            out.append(Encoding(
                global_desc=np.ascontiguousarray(g[i], dtype=np.float32),
                local=np.ascontiguousarray(local[i, :n], dtype=np.float32),
                local_index=idx.astype(np.int32),
                local_xy=local_cell_xy(idx, grid[1], (h, w), image_size),
                grid=grid, image_size=image_size))
    return out

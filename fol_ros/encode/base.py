"""The `Encoder` protocol every inference back end implements, and `create_encoder` that picks one."""
from __future__ import annotations

import dataclasses
import logging
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from fol_ros.config import EngineConfig, ModelConfig
from fol_ros.errors import EngineError
from fol_ros.records import Encoding, ModelInfo

log = logging.getLogger(__name__)


@runtime_checkable
class Encoder(Protocol):
    """Images in, FoL descriptors out.

    Attributes:
        info: the model identity (backbone, input size, checkpoint hash) the descriptors belong to.
        name: the back end, e.g. 'torch-cpu'.
    """

    info: ModelInfo
    name: str

    def encode(self, images: Sequence[np.ndarray], color: str = 'rgb') -> list[Encoding]:
        """Encode uint8 H x W x 3 images (any size) into one `Encoding` each."""
        ...


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'."""
    if device != 'auto':
        return device
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def resolve_checkpoint(model: ModelConfig) -> str:
    """The checkpoint path to load: the configured one, or the default ViT-S/14 (converted once, cached)."""
    if model.checkpoint:
        return model.checkpoint
    from fol_ros.model.weights import ensure_default_checkpoint
    return str(ensure_default_checkpoint())


def create_torch_encoder(model: ModelConfig, engine: EngineConfig):
    """A `TorchEncoder` for the configured checkpoint, backbone and input size."""
    from fol_ros.encode.torch_engine import TorchEncoder
    from fol_ros.model.checkpoint import load_checkpoint
    net, info = load_checkpoint(resolve_checkpoint(model), backbone=model.backbone)
    info = dataclasses.replace(info, input_size=model.input_size)
    return TorchEncoder(net, info, device=resolve_device(engine.device), precision=engine.precision,
                        max_batch=engine.max_batch)


def create_encoder(model: ModelConfig, engine: EngineConfig) -> Encoder:
    """Build the encoder the configuration asks for ('auto' logs which back end it chose and why)."""
    if engine.engine in ('auto', 'torch'):
        if engine.engine == 'auto':
            log.info('engine auto: using torch (the only back end built in so far)')
        return create_torch_encoder(model, engine)
    raise EngineError(f'engine {engine.engine!r} is not available in this build; use engine=torch')

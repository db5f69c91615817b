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
    """The checkpoint file `model.checkpoint` names: a path, or an alias resolved from the local caches only
    (`fol:vits14` = '' = the default ViT-S/14, converted once; `fol:base`, `fol:large` after
    `fol-ros weights download`). Raises CheckpointError with the command to run when an alias is not downloaded."""
    from fol_ros.model.hub import resolve
    return str(resolve(model.checkpoint)[0])


def load_model(model: ModelConfig):
    """(FoLNet on CPU in eval mode, ModelInfo at the configured input size) for the configured checkpoint.

    An alias is checked against the sha256 recorded when it was downloaded and verified."""
    from fol_ros.model.checkpoint import load_checkpoint
    from fol_ros.model.hub import DEFAULT_ALIAS
    net, info = load_checkpoint(model.checkpoint or DEFAULT_ALIAS, backbone=model.backbone)
    return net, dataclasses.replace(info, input_size=model.input_size)


def create_torch_encoder(model: ModelConfig, engine: EngineConfig, loaded=None):
    """A `TorchEncoder` for the configured checkpoint, backbone and input size."""
    from fol_ros.encode.torch_engine import TorchEncoder
    net, info = loaded or load_model(model)
    return TorchEncoder(net, info, device=resolve_device(engine.device), precision=engine.precision,
                        max_batch=engine.max_batch)


def _build(engine: EngineConfig, model: ModelConfig, loaded) -> Encoder:
    from fol_ros.encode.engine_cache import EngineCache
    net, info = loaded
    device = resolve_device(engine.device)
    if engine.engine == 'onnxruntime':
        from fol_ros.encode.onnx_engine import onnx_encoder_from_net
        return onnx_encoder_from_net(net, info, EngineCache.default(engine.cache_dir), device=device,
                                     max_batch=engine.max_batch)
    if engine.engine == 'tensorrt':
        from fol_ros.encode.tensorrt_engine import tensorrt_encoder_from_net
        return tensorrt_encoder_from_net(net, info, EngineCache.default(engine.cache_dir), device=device,
                                         precision=engine.precision, max_batch=engine.max_batch)
    return create_torch_encoder(model, engine, loaded)


def auto_plan(engine: EngineConfig) -> list[tuple[EngineConfig, str]]:
    """Back ends 'auto' tries, best first, each with why: TensorRT > torch CUDA > ONNX Runtime CPU > torch CPU."""
    from fol_ros.encode.onnx_engine import onnxruntime_providers
    from fol_ros.encode.tensorrt_engine import tensorrt_status
    device = resolve_device(engine.device)
    plan = []
    if device.startswith('cuda'):
        trt_ok, trt_why = tensorrt_status()
        if trt_ok:
            plan.append((dataclasses.replace(engine, engine='tensorrt', device=device), trt_why))
        plan.append((dataclasses.replace(engine, engine='torch', device=device),
                     f'CUDA GPU present ({"TensorRT unusable: " + trt_why if not trt_ok else "TensorRT fallback"})'))
    elif 'CPUExecutionProvider' in onnxruntime_providers():
        plan.append((dataclasses.replace(engine, engine='onnxruntime', device='cpu'),
                     'no CUDA GPU; ONNX Runtime is the fastest CPU back end'))
    plan.append((dataclasses.replace(engine, engine='torch', device='cpu'),
                 'CPU fallback' if plan else 'no CUDA GPU and no onnxruntime'))
    return plan


def create_encoder(model: ModelConfig, engine: EngineConfig) -> Encoder:
    """Build the encoder the configuration asks for ('auto' logs which back end it chose and why).

    Raises:
        EngineError: an explicitly chosen back end is unavailable (the message names the fix).
    """
    loaded = load_model(model)
    if engine.engine != 'auto':
        if engine.engine == 'tensorrt':
            from fol_ros.encode.tensorrt_engine import tensorrt_status
            ok, why = tensorrt_status()
            if not ok:
                raise EngineError(f'engine=tensorrt is unavailable: {why}')
        return _build(engine, model, loaded)
    plan = auto_plan(engine)
    for i, (choice, why) in enumerate(plan):
        try:
            encoder = _build(choice, model, loaded)
        except EngineError as exc:
            if i == len(plan) - 1:
                raise
            log.warning('engine auto: %s on %s failed (%s); trying the next back end', choice.engine,
                        choice.device, exc)
            continue
        log.info('engine auto: chose %s (%s)', encoder.name, why)
        return encoder
    raise EngineError('engine auto: no back end could be built')  # unreachable: the plan always ends with torch

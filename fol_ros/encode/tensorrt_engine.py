"""TensorRT inference engine: builds a plan from the verified ONNX export and runs it on torch CUDA buffers.

Written against the TensorRT 10 Python API (Builder / OnnxParser / IOptimizationProfile / IExecutionContext with
named tensors and `execute_async_v3`); no pycuda: inputs and outputs are torch CUDA tensors whose `data_ptr()`
is handed to the execution context, on torch's current CUDA stream. Plans are cached by `EngineCache` under a key
that includes the TensorRT version and the GPU's compute capability; a plan the runtime refuses is rebuilt.

FP16 is the default. The token selection (top-k over row-major positions up to 7921, which fp16 cannot count
exactly above 2048) and the Sinkhorn/normalisation layers after the backbone are pinned to fp32; the ViT
backbone and the transposed convolutions run in the requested precision.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Sequence

import numpy as np
import torch

from fol_ros.encode.engine_cache import ArtifactKey, EngineCache, StaleArtifactError
from fol_ros.encode.export import INPUT_NAME, OUTPUT_NAMES, cached_onnx
from fol_ros.encode.torch_engine import encode_in_batches
from fol_ros.errors import EngineError
from fol_ros.records import Encoding, ModelInfo

LOG = logging.getLogger(__name__)
FP16_SCOPES = ('/backbone/', '/upconv')   # ONNX node-name prefixes allowed to run in reduced precision
WORKSPACE_GB = 4.0


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT importable and a CUDA GPU visible to torch."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:   # OSError: bindings present but libnvinfer missing
        return False, (f'TensorRT is not importable ({exc}); install the tensorrt wheel that matches your CUDA '
                       '(pip install tensorrt-cu12) or use engine=torch')
    if not torch.cuda.is_available():
        return False, 'TensorRT needs a CUDA GPU and torch sees none; use engine=onnxruntime or engine=torch'
    return True, f'TensorRT {trt.__version__} on {torch.cuda.get_device_name()}'


def _trt():
    ok, reason = tensorrt_status()
    if not ok:
        raise EngineError(reason)
    import tensorrt as trt
    return trt


def compute_capability(device: str = 'cuda') -> str:
    """'sm_XY' of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return f'sm_{major}{minor}'


def tensorrt_key(info: ModelInfo, precision: str, batch_range: tuple[int, int, int], trt_version: str,
                 capability: str) -> ArtifactKey:
    """Cache key of a TensorRT plan: weights, size, precision, profile, TensorRT version, GPU architecture."""
    return ArtifactKey(kind='tensorrt', model_sha256=info.checkpoint_sha256, backbone=info.backbone,
                       input_size=info.input_size, precision=precision, batch_range=batch_range,
                       runtime=f'tensorrt-{trt_version}', device=capability)


def _pin_selection_fp32(trt, network) -> int:
    """Force fp32 on every float-producing layer outside the backbone/upconv scopes; returns how many."""
    floats = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(scope in layer.name for scope in FP16_SCOPES):
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or any(o.dtype not in floats for o in outs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def build_engine(onnx_path: pathlib.Path | str, plan_path: pathlib.Path | str, input_size: tuple[int, int],
                 precision: str = 'fp16', batch_range: tuple[int, int, int] = (1, 1, 8),
                 workspace_gb: float = WORKSPACE_GB) -> None:
    """Parse the ONNX graph and write a serialized TensorRT plan with one optimisation profile for batch min..max.

    Raises:
        EngineError: TensorRT unavailable, the parser rejected the graph, or the build failed.
    """
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; older versions need the flag.
    flags = 0 if int(trt.__version__.split('.')[0]) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = '; '.join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f'TensorRT could not parse {onnx_path}: {errors}')
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision in ('fp16', 'bf16'):
        config.set_flag(trt.BuilderFlag.FP16 if precision == 'fp16' else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        LOG.info('TensorRT: %d layers after the backbone pinned to fp32', _pin_selection_fp32(trt, network))
    lo, opt, hi = batch_range
    h, w = input_size
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (lo, 3, h, w), (opt, 3, h, w), (hi, 3, h, w))
    config.add_optimization_profile(profile)
    LOG.info('building TensorRT %s plan, batch %d..%d (opt %d), %dx%d: this takes minutes',
             precision, lo, hi, opt, h, w)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError('TensorRT failed to build the engine (see the TensorRT log above); try precision=fp32 '
                          'or a smaller max_batch')
    with open(plan_path, 'wb') as f:
        f.write(memoryview(plan))


class TensorRTEncoder:
    """FoL descriptors from a TensorRT plan, with torch CUDA tensors as I/O buffers.

    Args:
        plan_path: serialized engine from `build_engine`.
        info: model identity (input size must match the plan's profile).
        device: 'cuda' or 'cuda:N'.
        max_batch: images per run (<= the profile's max batch).
    Raises:
        StaleArtifactError: the runtime refused the plan (other TensorRT version or GPU); rebuild it.
    """

    def __init__(self, plan_path: pathlib.Path | str, info: ModelInfo, device: str = 'cuda', max_batch: int = 8,
                 precision: str = 'fp16') -> None:
        trt = _trt()
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(pathlib.Path(plan_path).read_bytes())
            if self.engine is None:
                raise StaleArtifactError(f'TensorRT {trt.__version__} cannot deserialize {plan_path}')
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = {INPUT_NAME, *OUTPUT_NAMES} - set(names)
        if missing:
            raise StaleArtifactError(f'{plan_path} lacks tensors {sorted(missing)}; it is not a FoL plan')
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0]
        self.max_batch = max(1, min(int(max_batch), int(hi)))
        self.info = info
        self.plan_path = pathlib.Path(plan_path)
        self.name = f'tensorrt-{precision}'

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the plan on a preprocessed batch [B,3,H,W]; outputs are CUDA tensors (global, local, index, valid)."""
        x = batch.to(self.device, dtype=self.dtypes[INPUT_NAME], non_blocking=True).contiguous()
        stream = torch.cuda.current_stream(self.device)
        if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise EngineError(f'batch shape {tuple(x.shape)} is outside the plan\'s profile; lower max_batch')
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        outs = []
        for name in OUTPUT_NAMES:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError('TensorRT execution failed (see the TensorRT log)')
        return tuple(outs)

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, ...]:
        """`forward` with outputs copied to numpy (the copy synchronises the stream)."""
        return tuple((t.float() if t.is_floating_point() else t).cpu().numpy() for t in self.forward(batch))

    def encode(self, images: Sequence[np.ndarray], color: str = 'rgb') -> list[Encoding]:
        """Encode uint8 images (RGB or BGR, any size) into one `Encoding` each."""
        return encode_in_batches(images, color, self.info, self.max_batch, self.run)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for trt_name, torch_type in (('int64', torch.int64), ('bfloat16', torch.bfloat16)):
        if hasattr(trt, trt_name):
            table[getattr(trt, trt_name)] = torch_type
    if dtype not in table:
        raise EngineError(f'TensorRT tensor type {dtype} has no torch equivalent')
    return table[dtype]


def tensorrt_encoder_from_net(net: torch.nn.Module, info: ModelInfo, cache: EngineCache, device: str = 'cuda',
                              precision: str = 'fp16', max_batch: int = 8, opt_batch: int = 1) -> TensorRTEncoder:
    """Export (cached, verified) ONNX, build or reuse the cached plan for this GPU and TensorRT, open it."""
    trt = _trt()
    device = 'cuda' if device == 'auto' else device
    onnx_path = cached_onnx(net, info, cache)
    batch_range = (1, max(1, min(opt_batch, max_batch)), max_batch)
    key = tensorrt_key(info, precision, batch_range, trt.__version__, compute_capability(device))

    def build(tmp: pathlib.Path) -> None:
        with torch.cuda.device(torch.device(device)):
            build_engine(onnx_path, tmp, info.input_size, precision, batch_range)

    return cache.open(key, build, lambda p: TensorRTEncoder(p, info, device, max_batch, precision))

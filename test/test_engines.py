"""Inference back ends behind one Encoder protocol: ONNX Runtime vs torch, auto selection, CUDA/TensorRT skips."""
import logging

import numpy as np
import pytest
import torch

from fol_ros.config import EngineConfig, ModelConfig
from fol_ros.encode.base import Encoder, auto_plan, create_encoder
from fol_ros.encode.engine_cache import EngineCache
from fol_ros.encode.export import boundary_ties, cell_patches
from fol_ros.encode.onnx_engine import OnnxEncoder, onnx_encoder_from_net, providers_for
from fol_ros.encode.tensorrt_engine import tensorrt_status
from fixtures.tiny_encoder import tiny_test_encoder
from fol_ros.errors import EngineError
from fol_ros.preprocess import preprocess

SIZE = (294, 294)
CUDA_REASON = 'no CUDA GPU visible to torch'


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(240, 320), (300, 300), (480, 360)]
    return [rng.integers(0, 256, (*shapes[i % 3], 3), dtype=np.uint8) for i in range(n)]


def _assert_same_encodings(a, b, net=None, images=None, cosine=0.9999, color='rgb'):
    """Same descriptors; token sets equal except for patches tied (float noise) at the 225th selection score."""
    ties = cells = None
    if net is not None:
        x = preprocess(images, SIZE, color)
        ties, cells = boundary_ties(net, x), cell_patches(SIZE)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert float(x.global_desc @ y.global_desc) >= cosine
        assert x.grid == y.grid and x.image_size == y.image_size
        differ = np.setxor1d(x.local_index, y.local_index)
        assert all(ties is not None and int(cells[c]) in ties[i] for c in differ), f'image {i}: {differ}'
        _, ia, ib = np.intersect1d(x.local_index, y.local_index, return_indices=True)
        assert len(ia) >= 0.9 * len(x.local_index)
        np.testing.assert_array_equal(x.local_xy[ia], y.local_xy[ib])
        assert np.min(np.sum(x.local[ia] * y.local[ib], axis=1)) >= 0.999


@pytest.fixture(scope='module')
def torch_enc():
    return tiny_test_encoder(seed=7, input_size=SIZE, max_batch=2)


@pytest.fixture(scope='module')
def onnx_enc(torch_enc, tmp_path_factory):
    cache = EngineCache(tmp_path_factory.mktemp('cache'))
    return onnx_encoder_from_net(torch_enc.net, torch_enc.info, cache, max_batch=2)


def test_onnxruntime_encoder_matches_torch(torch_enc, onnx_enc):
    assert isinstance(onnx_enc, Encoder) and onnx_enc.name == 'onnxruntime-cpu'
    assert onnx_enc.info == torch_enc.info
    images = _images(3)                                  # 3 images, max_batch 2: two runs of 2 and 1
    enc = onnx_enc.encode(images)
    _assert_same_encodings(torch_enc.encode(images), enc, torch_enc.net, images)
    assert enc[0].local.dtype == np.float32 and enc[0].local_index.dtype == np.int32
    assert enc[2].image_size == (480, 360)


def test_bgr_and_empty(torch_enc, onnx_enc):
    rgb = _images(1, seed=1)
    bgr = [im[:, :, ::-1].copy() for im in rgb]
    _assert_same_encodings(onnx_enc.encode(rgb), onnx_enc.encode(bgr, color='bgr'), torch_enc.net, rgb,
                           cosine=0.999999)
    assert onnx_enc.encode([]) == []


def test_onnx_encoder_refuses_other_input_size(torch_enc, onnx_enc):
    import dataclasses
    other = dataclasses.replace(torch_enc.info, input_size=(322, 322))
    with pytest.raises(EngineError, match='re-export'):
        OnnxEncoder(onnx_enc.path, other)


def test_onnxruntime_cuda_needs_the_gpu_build():
    import onnxruntime as ort
    if 'CUDAExecutionProvider' in ort.get_available_providers():
        pytest.skip('onnxruntime-gpu installed; this test covers the CPU-only build')
    with pytest.raises(EngineError, match='onnxruntime-gpu'):
        providers_for('cuda')


def test_onnxruntime_cuda_provider_gets_the_device_index(monkeypatch):
    monkeypatch.setattr('fol_ros.encode.onnx_engine.onnxruntime_providers',
                        lambda: ['CUDAExecutionProvider', 'CPUExecutionProvider'])
    assert providers_for('cuda:1') == [('CUDAExecutionProvider', {'device_id': 1}), 'CPUExecutionProvider']
    assert providers_for('cpu') == ['CPUExecutionProvider']
    monkeypatch.setattr('fol_ros.encode.onnx_engine.onnxruntime_providers', lambda: [])
    with pytest.raises(EngineError, match='pip install onnxruntime'):
        providers_for('cpu')


@pytest.fixture
def tiny_ckpt(tmp_path):
    from fol_ros.model.checkpoint import save_checkpoint
    return save_checkpoint(tiny_test_encoder(seed=8).net, tmp_path / 'tiny.pth')


def test_auto_on_cpu_picks_onnxruntime_and_reuses_the_export(tiny_ckpt, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    model = ModelConfig(checkpoint=str(tiny_ckpt), input_size=SIZE)
    engine = EngineConfig(engine='auto', cache_dir=str(tmp_path / 'cache'))
    with caplog.at_level(logging.INFO, logger='fol_ros.encode'):
        first = create_encoder(model, engine)
    assert first.name == 'onnxruntime-cpu'
    assert 'engine auto: chose onnxruntime-cpu' in caplog.text and 'no CUDA GPU' in caplog.text
    assert 'building onnx' in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='fol_ros.encode'):
        second = create_encoder(model, engine)
    assert 'using cached onnx' in caplog.text and 'building onnx' not in caplog.text
    explicit = create_encoder(model, EngineConfig(engine='torch', device='cpu'))
    assert explicit.name == 'torch-cpu'
    images = _images(2, seed=3)
    _assert_same_encodings(explicit.encode(images), second.encode(images), explicit.net, images)


def test_auto_falls_back_to_torch_when_onnx_fails(tiny_ckpt, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)

    def broken(*args, **kwargs):
        raise EngineError('export exploded')

    monkeypatch.setattr('fol_ros.encode.onnx_engine.onnx_encoder_from_net', broken)
    model = ModelConfig(checkpoint=str(tiny_ckpt), input_size=SIZE)
    with caplog.at_level(logging.INFO, logger='fol_ros.encode'):
        enc = create_encoder(model, EngineConfig(cache_dir=str(tmp_path)))
    assert enc.name == 'torch-cpu'
    assert 'export exploded' in caplog.text and 'chose torch-cpu' in caplog.text
    with pytest.raises(EngineError, match='export exploded'):      # an explicit choice does not fall back
        create_encoder(model, EngineConfig(engine='onnxruntime', cache_dir=str(tmp_path)))


def test_auto_order_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr('fol_ros.encode.tensorrt_engine.tensorrt_status', lambda: (True, 'TensorRT 10.3 on X'))
    plan = [(c.engine, c.device) for c, _ in auto_plan(EngineConfig())]
    assert plan == [('tensorrt', 'cuda'), ('torch', 'cuda'), ('torch', 'cpu')]
    monkeypatch.setattr('fol_ros.encode.tensorrt_engine.tensorrt_status', lambda: (False, 'no libnvinfer'))
    plan = auto_plan(EngineConfig(device='cuda:1'))
    assert [(c.engine, c.device) for c, _ in plan] == [('torch', 'cuda:1'), ('torch', 'cpu')]
    assert 'no libnvinfer' in plan[0][1]


def test_auto_order_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert [c.engine for c, _ in auto_plan(EngineConfig())] == ['onnxruntime', 'torch']
    monkeypatch.setattr('fol_ros.encode.onnx_engine.onnxruntime_providers', lambda: [])
    assert [c.engine for c, _ in auto_plan(EngineConfig())] == ['torch']


def test_explicit_tensorrt_unavailable_names_the_fix(tiny_ckpt, monkeypatch):
    monkeypatch.setattr('fol_ros.encode.tensorrt_engine.tensorrt_status', lambda: (False, 'TensorRT is not '
                        'importable; install the tensorrt wheel or use engine=torch'))
    with pytest.raises(EngineError, match='engine=tensorrt is unavailable.*engine=torch'):
        create_encoder(ModelConfig(checkpoint=str(tiny_ckpt)), EngineConfig(engine='tensorrt'))


def test_tensorrt_status_reason_here():
    ok, why = tensorrt_status()
    assert isinstance(ok, bool) and why
    if not ok:
        assert 'engine=' in why           # the message always says what to use instead


def test_explicit_cuda_without_gpu_fails_clearly(tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip('a CUDA GPU is present; this test covers its absence')
    with pytest.raises(EngineError, match='device=cpu'):
        create_encoder(ModelConfig(checkpoint=str(tiny_ckpt)), EngineConfig(engine='torch', device='cuda'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_torch_cuda_autocast_matches_cpu(precision):
    from fol_ros.encode.torch_engine import TorchEncoder
    cpu = tiny_test_encoder(seed=9, input_size=SIZE)
    gpu = TorchEncoder(tiny_test_encoder(seed=9, input_size=SIZE).net, cpu.info, device='cuda',
                       precision=precision)
    assert gpu.name == f'torch-cuda-{precision}'
    images = _images(2, seed=4)
    for x, y in zip(cpu.encode(images), gpu.encode(images)):
        assert float(x.global_desc @ y.global_desc) >= 0.99
        same = np.intersect1d(x.local_index, y.local_index).size
        assert same >= 0.95 * max(len(x.local_index), len(y.local_index))


@pytest.mark.skipif(not tensorrt_status()[0], reason=tensorrt_status()[1])
def test_tensorrt_matches_torch(tmp_path):
    from fol_ros.encode.tensorrt_engine import tensorrt_encoder_from_net
    cpu = tiny_test_encoder(seed=10, input_size=SIZE)
    trt_enc = tensorrt_encoder_from_net(tiny_test_encoder(seed=10, input_size=SIZE).net, cpu.info,
                                        EngineCache(tmp_path), precision='fp32', max_batch=2)
    images = _images(3)
    _assert_same_encodings(cpu.encode(images), trt_enc.encode(images), cpu.net, images, cosine=0.999)

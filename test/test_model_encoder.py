"""TorchEncoder / create_encoder on tiny seeded models: records, geometry, colour order, configuration."""
import numpy as np
import pytest
import torch

from fol_ros.config import EngineConfig, ModelConfig
from fol_ros.encode import Encoder, create_encoder
from fixtures.tiny_encoder import tiny_test_encoder
from fol_ros.encode.torch_engine import TorchEncoder, local_cell_xy
from fol_ros.errors import BadInputError, EngineError
from fol_ros.model.checkpoint import save_checkpoint
from fol_ros.model.fol import FoLNet
from fol_ros.preprocess import preprocess


@pytest.fixture(scope='module')
def encoder() -> TorchEncoder:
    return tiny_test_encoder(seed=0, input_size=(294, 294), max_batch=2)


@pytest.fixture(scope='module')
def images():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in ((120, 160, 3), (300, 200, 3), (294, 294, 3))]


def test_protocol_and_records(encoder, images):
    assert isinstance(encoder, Encoder) and encoder.name == 'torch-cpu'
    encs = encoder.encode(images)
    assert len(encs) == 3
    for enc, im in zip(encs, images):
        n = enc.local.shape[0]
        assert enc.global_desc.shape == (8448,) and enc.global_desc.dtype == np.float32
        assert 2745 <= n <= 3600 and enc.local.shape == (n, 128) and enc.local.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(enc.local, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(enc.global_desc), 1, atol=1e-5)
        assert enc.local_index.dtype == np.int32 and (np.diff(enc.local_index) > 0).all()
        assert enc.grid == (81, 81) and enc.image_size == im.shape[:2]
        assert enc.local_xy.shape == (n, 2) and enc.local_xy.dtype == np.float32
        assert (enc.local_xy[:, 0] < im.shape[1]).all() and (enc.local_xy[:, 1] < im.shape[0]).all()


def test_batching_and_seed_are_deterministic(encoder, images):
    one_by_one = [encoder.encode([im])[0] for im in images]
    batched = encoder.encode(images)
    again = tiny_test_encoder(seed=0, input_size=(294, 294)).encode(images)
    for a, b, c in zip(one_by_one, batched, again):
        np.testing.assert_allclose(a.global_desc, b.global_desc, atol=1e-5)
        np.testing.assert_array_equal(b.local_index, c.local_index)
    other = tiny_test_encoder(seed=1, input_size=(294, 294))
    assert other.info.fingerprint != encoder.info.fingerprint


def test_bgr_equals_rgb(encoder, images):
    a = encoder.encode(images[:1])[0]
    b = encoder.encode([images[0][:, :, ::-1].copy()], color='bgr')[0]
    np.testing.assert_array_equal(a.global_desc, b.global_desc)


def test_encoding_equals_network_output(encoder, images):
    with torch.inference_mode():
        out = encoder.net(preprocess(images[:1], (294, 294)))
    enc = encoder.encode(images[:1])[0]
    n = int(out.local_count[0])
    np.testing.assert_array_equal(enc.local_index, out.local_index[0, :n].numpy())
    np.testing.assert_allclose(enc.local, out.local[0, :n].numpy(), atol=1e-6)


def test_local_xy_geometry():
    # cell (u=row 2, v=col 3) of the 89-grid at 322 px is at (3.5*3+7, 3.5*2+7) = (17.5, 14) px in network space
    xy = local_cell_xy(np.array([2 * 89 + 3]), 89, (322, 322), (322, 322))
    np.testing.assert_allclose(xy, [[17.5, 14.0]])
    xy = local_cell_xy(np.array([2 * 89 + 3, 88 * 89 + 88]), 89, (322, 322), (644, 161))
    np.testing.assert_allclose(xy, [[17.5 * 161 / 322, 28.0], [(3.5 * 88 + 7) / 2, (3.5 * 88 + 7) * 2]])


def test_empty_and_bad_input(encoder):
    assert encoder.encode([]) == []
    with pytest.raises(BadInputError, match='uint8'):
        encoder.encode([np.zeros((50, 50, 3), dtype=np.float64)])


def test_create_encoder_from_checkpoint(tmp_path, images):
    torch.manual_seed(0)
    path = save_checkpoint(FoLNet('tiny'), tmp_path / 'tiny.pth')
    enc = create_encoder(ModelConfig(checkpoint=str(path), input_size=(322, 322)),
                         EngineConfig(engine='torch', device='cpu', max_batch=2))
    assert enc.info.input_size == (322, 322) and enc.info.backbone == 'tiny'
    assert enc.encode(images[:1])[0].grid == (89, 89)


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_without_gpu_is_refused():
    with pytest.raises(EngineError, match='no CUDA'):
        TorchEncoder(FoLNet('tiny'), tiny_test_encoder().info, device='cuda')

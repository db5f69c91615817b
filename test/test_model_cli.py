"""`fol-ros describe` and `fol-ros weights path` (parsers built from fol_ros.commands.model alone)."""
import argparse

import cv2
import numpy as np
import pytest
import torch

from fol_ros.commands import model as model_cmd
from fol_ros.errors import BadInputError, ConfigError
from fol_ros.model.checkpoint import save_checkpoint
from fol_ros.model.fol import FoLNet
from fol_ros.preprocess import preprocess


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='fol-ros')
    model_cmd.register(parser.add_subparsers(dest='command', required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('describe')
    torch.manual_seed(2)
    net = FoLNet('tiny').eval()
    ckpt = save_checkpoint(net, tmp / 'tiny.pth')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((120, 160, 3), (200, 150, 3))]
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp / f'im{i}.png'))
        cv2.imwrite(paths[-1], im[:, :, ::-1])   # PNG is lossless: the file holds exactly `im` (RGB)
    return tmp, net, ckpt, images, paths


def test_describe_writes_the_documented_arrays(setup):
    tmp, net, ckpt, images, paths = setup
    out = tmp / 'd.npz'
    assert _run(['describe', '--checkpoint', str(ckpt), '--size', '294', '322', '--batch-size', '1',
                 '--out', str(out), *paths]) == 0
    d = np.load(out)
    assert set(d.files) == {'global', 'local', 'local_count', 'local_index', 'grid'}
    assert d['global'].shape == (2, 8448) and d['global'].dtype == np.float32
    assert d['local'].shape == (2, 3600, 128) and d['local_index'].shape == (2, 3600)
    assert d['grid'].tolist() == [81, 89]
    with torch.inference_mode():
        ref = net(preprocess(images, (294, 322)))
    np.testing.assert_allclose(d['global'], ref.global_desc.numpy(), atol=1e-6)
    np.testing.assert_array_equal(d['local_count'], ref.local_count.numpy())
    np.testing.assert_array_equal(d['local_index'], ref.local_index.numpy())
    for b in range(2):
        n = d['local_count'][b]
        assert (d['local_index'][b, n:] == -1).all() and (d['local'][b, n:] == 0).all()


def test_describe_errors(setup):
    tmp, _, ckpt, _, paths = setup
    with pytest.raises(ConfigError, match='multiple of the ViT patch size'):
        _run(['describe', '--checkpoint', str(ckpt), '--size', '300', '--out', str(tmp / 'x.npz'), *paths])
    with pytest.raises(ConfigError, match='S or H W'):
        _run(['describe', '--checkpoint', str(ckpt), '--size', '322', '322', '322', '--out', str(tmp / 'x.npz'),
              *paths])
    (tmp / 'broken.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(BadInputError, match='broken.jpg'):
        _run(['describe', '--checkpoint', str(ckpt), '--out', str(tmp / 'x.npz'), str(tmp / 'broken.jpg')])


def test_weights_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('FOL_ROS_CACHE', str(tmp_path))
    assert _run(['weights', 'path']) == 1          # not converted yet in this empty cache
    assert capsys.readouterr().out.strip() == str(tmp_path / 'checkpoints' / 'fol_vits14_imgfocus-0.1.1.pth')

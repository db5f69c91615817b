"""Checkpoint loading (official nested/flat layouts, DINOv2 backbone-only), strict errors, deterministic saving."""
import pickle

import pytest
import torch

from fol_ros.errors import CheckpointError
from fol_ros.model.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from fol_ros.model.fol import FoLNet


@pytest.fixture(scope='module')
def net() -> FoLNet:
    torch.manual_seed(3)
    return FoLNet('tiny').eval()


def _same_weights(a: FoLNet, b: FoLNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_layout_round_trip(net, tmp_path):
    path = save_checkpoint(net, tmp_path / 'ckpt.pth', label='my label')
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {'model_state_dict'}
    assert all(k.startswith('module.') for k in raw['model_state_dict'])
    loaded, info = load_checkpoint(path, input_size=(504, 504))
    assert _same_weights(net, loaded) and not loaded.training
    assert info.backbone == 'tiny' and info.input_size == (504, 504) and info.label == 'my label'
    assert info.checkpoint_sha256 == file_sha256(path)


def test_saving_is_byte_deterministic(net, tmp_path):
    a = save_checkpoint(net, tmp_path / 'a.pth')
    b = save_checkpoint(net, tmp_path / 'b.pth')
    assert file_sha256(a) == file_sha256(b)
    assert not list(tmp_path.glob('*.tmp'))


@pytest.mark.parametrize('layout', ['flat', 'flat_module', 'nested_plain', 'training_file'])
def test_accepted_layouts(net, tmp_path, layout):
    sd = net.state_dict()
    obj = {
        'flat': sd,
        'flat_module': {'module.' + k: v for k, v in sd.items()},
        'nested_plain': {'model_state_dict': sd},
        'training_file': {'epoch_num': 3, 'model_state_dict': {'module.' + k: v for k, v in sd.items()},
                          'recalls': [90.0, 95.0], 'best_r5': 95.0, 'not_improved_num': 0},
    }[layout]
    torch.save(obj, tmp_path / 'x.pth')
    loaded, _ = load_checkpoint(tmp_path / 'x.pth')
    assert _same_weights(net, loaded)


def test_only_a_leading_module_prefix_is_stripped(net, tmp_path):
    sd = {'module.' + k.replace('aggregator.', 'aggregator.module.'): v for k, v in net.state_dict().items()}
    torch.save(sd, tmp_path / 'x.pth')
    with pytest.raises(CheckpointError, match='unexpected keys: aggregator.module.'):
        load_checkpoint(tmp_path / 'x.pth')


def test_strict_errors_name_the_keys(net, tmp_path):
    sd = dict(net.state_dict())
    sd.pop('upconv.bias')
    sd['aggregator.dust_bin'] = torch.zeros(1)
    sd['upconv2.bias'] = torch.zeros(7)
    torch.save(sd, tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / 'bad.pth')
    msg = str(err.value)
    assert '1 missing keys: upconv.bias' in msg and 'unexpected keys: aggregator.dust_bin' in msg
    assert 'upconv2.bias (7,) (model wants (128,))' in msg and 'official FoL checkpoint' in msg


def test_backbone_mismatch_and_inference(net, tmp_path):
    path = save_checkpoint(net, tmp_path / 'x.pth')
    with pytest.raises(CheckpointError, match="holds a tiny backbone but backbone='vitb14'"):
        load_checkpoint(path, backbone='vitb14')
    sd = dict(net.state_dict())
    sd['backbone.model.cls_token'] = torch.zeros(1, 1, 100)
    torch.save(sd, tmp_path / 'odd.pth')
    with pytest.raises(CheckpointError, match='width 100 and 4 blocks'):
        load_checkpoint(tmp_path / 'odd.pth')


def test_dinov2_backbone_only_gets_seeded_heads(net, tmp_path):
    pre = 'backbone.model.'
    meta = {k[len(pre):]: v for k, v in net.state_dict().items() if k.startswith(pre)}
    meta['head.weight'] = torch.zeros(1)  # Meta files may carry a (unused) head; it is dropped
    torch.save(meta, tmp_path / 'dinov2.pth')
    a, info = load_checkpoint(tmp_path / 'dinov2.pth')
    b, _ = load_checkpoint(tmp_path / 'dinov2.pth')
    assert 'untrained FoL heads' in info.label
    sa, sn = a.state_dict(), net.state_dict()
    assert all(torch.equal(sa[k], sn[k]) for k in sn if k.startswith(pre))
    assert _same_weights(a, b)                       # heads are seeded, hence reproducible
    assert not torch.equal(sa['upconv.weight'], sn['upconv.weight'])


def test_registers_are_refused(net, tmp_path):
    pre = 'backbone.model.'
    meta = {k[len(pre):]: v for k, v in net.state_dict().items() if k.startswith(pre)}
    meta['register_tokens'] = torch.zeros(1, 4, 64)
    torch.save(meta, tmp_path / 'reg.pth')
    with pytest.raises(CheckpointError, match='register tokens'):
        load_checkpoint(tmp_path / 'reg.pth')


class _Evil:
    def __reduce__(self):
        return (print, ('pickle code ran',))


def test_untrusted_pickles_and_missing_files_are_refused(tmp_path):
    with open(tmp_path / 'evil.pth', 'wb') as fh:
        pickle.dump({'model_state_dict': _Evil()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match='weights_only'):
        load_checkpoint(tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint(tmp_path / 'nope.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='not a PyTorch checkpoint: it is a text file'):
        load_checkpoint(tmp_path / 'junk.pth')


# Damaged files are refused at load, each with what is wrong (issue 16, item 7) --------------------------------
def test_empty_file_is_refused(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'is empty \(0 bytes\)'):
        load_checkpoint(tmp_path / 'empty.pth')


def test_text_file_is_refused(tmp_path):
    (tmp_path / 'page.pth').write_text('<!DOCTYPE html><html><body>Download FoL_base.pth</body></html>\n')
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint: it is a text file \(\d+ bytes, starts "
                                              r"with b'<!DOCTYPE html>"):
        load_checkpoint(tmp_path / 'page.pth')
    (tmp_path / 'binary.pth').write_bytes(bytes(range(256)))
    with pytest.raises(CheckpointError, match='neither a torch.save zip archive nor a legacy torch pickle'):
        load_checkpoint(tmp_path / 'binary.pth')


def test_directory_is_refused_as_a_directory(tmp_path):
    (tmp_path / 'ckpt.pth').mkdir()
    with pytest.raises(CheckpointError, match='is a directory, not a file'):
        load_checkpoint(tmp_path / 'ckpt.pth')


def test_truncated_file_is_refused(net, tmp_path):
    data = save_checkpoint(net, tmp_path / 'ok.pth').read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or damaged torch.save archive'):
        load_checkpoint(tmp_path / 'cut.pth')


@pytest.mark.parametrize('extra', ['module.backbone.model.blocks.4.norm1.weight', 'module.backbone.model.blocks.x',
                                   'module.aggregator.extra_bias'])
def test_extra_keys_are_named(net, tmp_path, extra):
    sd = {'module.' + k: v for k, v in net.state_dict().items()}
    sd[extra] = torch.ones(64)
    torch.save({'model_state_dict': sd}, tmp_path / 'extra.pth')
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / 'extra.pth')
    assert f'1 unexpected keys: {extra.removeprefix("module.")}' in str(err.value)
    assert 'blocks, which is none of' not in str(err.value)


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_weights_are_refused(net, tmp_path, value):
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd['upconv.weight'].view(-1)[5] = value
    sd['backbone.model.blocks.2.mlp.fc1.bias'][:3] = value
    torch.save({'model_state_dict': sd}, tmp_path / 'nan.pth')
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / 'nan.pth')
    msg = str(err.value)
    assert 'NaN or infinite values in 2 tensors' in msg
    assert 'backbone.model.blocks.2.mlp.fc1.bias (3 of 256)' in msg and 'upconv.weight (1 of ' in msg


def test_expected_sha256_is_checked_before_parsing(net, tmp_path):
    path = save_checkpoint(net, tmp_path / 'ok.pth')
    _, info = load_checkpoint(path, expected_sha256=file_sha256(path))
    assert info.checkpoint_sha256 == file_sha256(path)
    with pytest.raises(CheckpointError, match='not 0000000000000000… recorded when it was verified'):
        load_checkpoint(path, expected_sha256='0' * 64)

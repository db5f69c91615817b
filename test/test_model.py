"""FoLNet structure, invariants and the equality of its three forwards (tiny seeded model unless stated)."""
import numpy as np
import pytest
import torch

from fol_ros.errors import BadInputError, ConfigError
from fol_ros.model.backbone import ARCHS, interpolate_pos_embed
from fol_ros.model.fol import FoLNet
from fol_ros.model.local_head import legacy_nearest_map, local_cell_to_patch

OFFICIAL = {'vitb14': (191, 90_056_256), 'vitl14': (359, 308_827_456)}


def analytic_params(dim: int, depth: int) -> tuple[int, int]:
    """(keys, parameters) of a FoL network from fol-method §6.1, computed independently of the module code."""
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim + (4 * dim * dim + 4 * dim) \
        + (4 * dim * dim + dim)
    backbone = dim + 1370 * dim + dim + (dim * 3 * 196 + dim) + depth * block + 2 * dim
    heads = (dim * 512 + 512 + 512 * 256 + 256) + 2 * (dim * 512 + 512) + (512 * 128 + 128) + (512 * 64 + 64) \
        + (dim * 256 * 9 + 256) + (256 * 128 * 9 + 128)
    return 5 + 14 * depth + 2 + 16, backbone + heads


@pytest.fixture(scope='module')
def tiny() -> FoLNet:
    torch.manual_seed(0)
    return FoLNet('tiny').eval()


@pytest.mark.parametrize('name', ['vits14', 'vitb14', 'vitl14', 'tiny'])
def test_key_and_parameter_counts(name):
    with torch.device('meta'):
        net = FoLNet(name)
    sd = net.state_dict()
    arch = ARCHS[name]
    counts = (len(sd), sum(v.numel() for v in sd.values()))
    assert counts == analytic_params(arch.dim, arch.depth)
    if name in OFFICIAL:
        assert counts == OFFICIAL[name]
    if name == 'vits14':
        assert counts == (191, 24_057_792)   # derived: 22,056,576 backbone + 2,001,216 heads


def test_official_key_layout():
    with torch.device('meta'):
        sd = FoLNet('vitb14').state_dict()
    keys = list(sd)
    assert keys[:5] == ['backbone.model.cls_token', 'backbone.model.pos_embed', 'backbone.model.mask_token',
                        'backbone.model.patch_embed.proj.weight', 'backbone.model.patch_embed.proj.bias']
    assert keys[5:19] == [f'backbone.model.blocks.0.{k}' for k in (
        'norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
        'ls1.gamma', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
        'mlp.fc2.bias', 'ls2.gamma')]
    assert keys[-18:-14] == ['backbone.model.norm.weight', 'backbone.model.norm.bias',
                             'aggregator.token_features.0.weight', 'aggregator.token_features.0.bias']
    assert keys[-4:] == ['upconv.weight', 'upconv.bias', 'upconv2.weight', 'upconv2.bias']
    assert tuple(sd['backbone.model.pos_embed'].shape) == (1, 1370, 768)
    assert tuple(sd['upconv.weight'].shape) == (768, 256, 3, 3)
    assert tuple(sd['aggregator.score.3.weight'].shape) == (64, 512, 1, 1)


@pytest.mark.parametrize('size,lo', [(322, 3057), (504, 2745)])
def test_invariants_and_fixed_equals_dynamic(tiny, size, lo):
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.inference_mode():
        out = tiny(x)
        g, local, index, valid = tiny.forward_fixed(x)
    h = size // 14
    assert out.grid == (4 * h - 3, 4 * h - 3)
    assert g.shape == (3, 8448) and local.shape == (3, 3600, 128) and index.dtype == torch.int64
    torch.testing.assert_close(g.norm(dim=1), torch.ones(3))
    assert (out.mask.sum(dim=(1, 2)) == 225).all()
    assert ((out.local_count >= lo) & (out.local_count <= 3600)).all()
    for b in range(3):
        n = int(out.local_count[b])
        torch.testing.assert_close(local[b, :n].norm(dim=1), torch.ones(n))
        assert (local[b, n:] == 0).all() and (index[b, n:] == -1).all() and not valid[b, n:].any()
        assert (torch.diff(index[b, :n]) > 0).all()   # row-major order
    assert torch.equal(g, out.global_desc)
    assert torch.equal(index, out.local_index) and torch.equal(valid.sum(1), out.local_count)
    assert torch.equal(local, out.local)


def test_non_square_input(tiny):
    x = torch.randn(1, 3, 294, 420)
    with torch.inference_mode():
        out = tiny(x)
        _, local, index, _ = tiny.forward_fixed(x)
    assert out.grid == (81, 117) and out.mask.shape == (1, 21, 30)
    assert torch.equal(index, out.local_index) and torch.equal(local, out.local)


@pytest.mark.parametrize('shape', [(1, 3, 280, 280), (1, 3, 322, 300), (1, 3, 224, 224), (3, 322, 322)])
def test_bad_input_sizes(tiny, shape):
    with pytest.raises(BadInputError, match='14|294|B, 3, H, W'):
        tiny(torch.zeros(shape))


def test_unknown_backbone():
    with pytest.raises(ConfigError, match='vitb14'):
        FoLNet('vit_huge')


@pytest.mark.parametrize('src,dst', [(23, 89), (36, 141), (21, 81), (30, 117), (50, 197)])
def test_nearest_map_equals_torch(src, dst):
    ref = torch.nn.functional.interpolate(torch.arange(src, dtype=torch.float32)[None, None, :, None],
                                          (dst, 1), mode='nearest')[0, 0, :, 0].long().numpy()
    assert np.array_equal(legacy_nearest_map(src, dst), ref)


def test_tokens_per_patch_row_at_322_and_504():
    # fol-method §5: patch rows 7, 15, 22 (322) and 11, 23, 35 (504) get 3 local rows, the others 4.
    for h, short in ((23, [7, 15, 22]), (36, [11, 23, 35])):
        counts = np.bincount(legacy_nearest_map(h, 4 * h - 3), minlength=h)
        assert sorted(np.nonzero(counts == 3)[0].tolist()) == short and set(counts) == {3, 4}
    assert local_cell_to_patch(23, 23).shape == (89 * 89,)


def test_pos_embed_kludge():
    pe = torch.randn(1, 1370, 8, generator=torch.Generator().manual_seed(0))
    assert interpolate_pos_embed(pe, 37, 37) is pe
    out = interpolate_pos_embed(pe, 23, 23)
    grid = pe[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    kludge = torch.nn.functional.interpolate(grid, scale_factor=(23.1 / 37, 23.1 / 37), mode='bicubic')
    plain = torch.nn.functional.interpolate(grid, size=(23, 23), mode='bicubic')
    assert out.shape == (1, 530, 8) and torch.equal(out[:, 0], pe[:, 0])
    torch.testing.assert_close(out[:, 1:], kludge.permute(0, 2, 3, 1).reshape(1, 529, 8), rtol=0, atol=0)
    assert (out[:, 1:] - plain.permute(0, 2, 3, 1).reshape(1, 529, 8)).abs().max() > 1e-3


def test_forward_train(tiny):
    torch.manual_seed(1)
    net = FoLNet('tiny')
    x = torch.randn(2, 3, 322, 322)
    net.train()
    out = net.forward_train(x)
    assert out.g.shape == (2, 8448) and out.local.shape == (2, 3600, 128)
    assert out.local_sep.shape == (2, 89, 89, 128) and out.mask_sep.shape == (2, 89, 89)
    assert out.f_norm.shape == (2, 64, 529) and out.p.shape == (2, 64, 529) and out.mask_guide.shape == (2, 529)
    assert out.local_all.requires_grad and not out.local_sep.requires_grad
    assert torch.isfinite(out.kl1) and torch.isfinite(out.kl2) and out.kl1 >= 0 and out.kl2 >= 0
    loss = out.g.sum() + out.local.sum() + out.kl1 + out.kl2
    loss.backward()
    blocks = net.backbone.model.blocks
    # the token preparation runs under no_grad (tiny has exactly the 4 trainable blocks, so none is frozen)
    assert net.backbone.model.pos_embed.grad is None and net.backbone.model.patch_embed.proj.weight.grad is None
    assert blocks[-1].attn.qkv.weight.grad is not None and net.upconv.weight.grad is not None
    # dropout is active only in train(): two train passes differ, two eval passes agree
    small = torch.randn(1, 3, 294, 294)
    with torch.no_grad():
        a, b = net.forward_train(small).g, net.forward_train(small).g
        net.eval()
        c, d = net.forward_train(small).g, net.forward_train(small).g
    assert not torch.equal(a, b) and torch.equal(c, d)
    # shapes are derived from the input (no hard-coded 529/89)
    with torch.no_grad():
        out504 = net.forward_train(torch.randn(1, 3, 504, 504))
    assert out504.p.shape == (1, 64, 1296) and out504.local_sep.shape == (1, 141, 141, 128)

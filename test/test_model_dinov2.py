"""Our backbone against Meta's own DINOv2 code (the `dinov2==0.0.1.dev2` wheel's sources, unpacked, not installed:
it pins torch 2.0). Runs when FOL_ROS_DINOV2_SRC points at the folder holding `dinov2/`, e.g.
  pip download --no-deps dinov2==0.0.1.dev2 -d /tmp/d && unzip /tmp/d/*.whl -d /tmp/d/src
  FOL_ROS_DINOV2_SRC=/tmp/d/src pytest test/test_model_dinov2.py
"""
import os
import sys
import warnings

import pytest
import torch

from fol_ros.model.fol import FoLNet

SRC = os.environ.get('FOL_ROS_DINOV2_SRC', '')
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(SRC, 'dinov2')),
                                reason='set FOL_ROS_DINOV2_SRC to unpacked dinov2 sources')


@pytest.fixture(scope='module')
def pair():
    sys.path.insert(0, SRC)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from dinov2.models.vision_transformer import vit_small
    torch.manual_seed(0)
    meta = vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).eval()
    net = FoLNet('vits14').eval()
    with torch.no_grad():
        for p in net.backbone.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pre = 'backbone.model.'
    meta.load_state_dict({k[len(pre):]: v for k, v in net.state_dict().items() if k.startswith(pre)}, strict=True)
    return meta, net


@pytest.mark.parametrize('size', [(322, 322), (308, 392), (518, 518)])
def test_backbone_matches_meta_dinov2(pair, size):
    meta, net = pair
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        feats = meta.forward_features(x)
        y = meta.prepare_tokens_with_masks(x)
        for blk in meta.blocks[:-1]:
            y = blk(y)
        last = meta.blocks[-1]
        z = last.norm1(y)
        b, n, c = z.shape
        qkv = last.attn.qkv(z).reshape(b, n, 3, last.attn.num_heads, c // last.attn.num_heads).permute(2, 0, 3, 1, 4)
        att = ((qkv[0] @ qkv[1].transpose(-2, -1)) * last.attn.scale).softmax(-1)[:, :, 0, 1:].sum(1)
        f, t, a = net.backbone(x)
    h, w = size[0] // 14, size[1] // 14
    torch.testing.assert_close(f, feats['x_norm_patchtokens'].reshape(1, h, w, -1).permute(0, 3, 1, 2),
                               rtol=0, atol=2e-5)
    torch.testing.assert_close(t, feats['x_norm_clstoken'], rtol=0, atol=2e-5)
    torch.testing.assert_close(a, att, rtol=0, atol=1e-7)

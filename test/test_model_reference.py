"""FoLNet against a literal, slow re-statement of the official computation (fol-method §2-§5), op by op:
explicit softmax attention, full last-block attention matrix, SALAD's Sinkhorn with a filled coupling matrix,
`repeat`-based VLAD, in-place top-value replacement, 'nearest' mask upsampling with boolean gather and
pad_sequence. Runs on the tiny seeded model; the ViT-B/L parity check against the official code is done outside.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from fol_ros.model.fol import FoLNet


def ref_pos(vit, x, w, h):
    npatch, n = x.shape[1] - 1, vit.pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return vit.pos_embed
    pe = vit.pos_embed.float()
    dim, m = x.shape[-1], int(math.sqrt(n))
    w0, h0 = w // 14, h // 14
    grid = F.interpolate(pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode='bicubic', antialias=False,
                         scale_factor=(float(w0 + 0.1) / m, float(h0 + 0.1) / m))
    return torch.cat((pe[:, 0].unsqueeze(0), grid.permute(0, 2, 3, 1).view(1, -1, dim)), dim=1).to(x.dtype)


def ref_attention(blk, x, want_map=False):
    b, n, c = x.shape
    a = blk.attn
    qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    att = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)
    out = a.proj((att @ v).transpose(1, 2).reshape(b, n, c))
    return out, (att[:, :, 0, 1:].sum(dim=1) if want_map else None)


def ref_backbone(vit, img):
    b, _, w, h = img.shape                          # DINOv2 names dim 2 "w"
    x = vit.patch_embed.proj(img).flatten(2).transpose(1, 2)
    x = torch.cat((vit.cls_token.expand(b, -1, -1), x), dim=1)
    x = x + ref_pos(vit, x, w, h)
    att = None
    for i, blk in enumerate(vit.blocks):
        y, m = ref_attention(blk, x, want_map=i == len(vit.blocks) - 1)
        att = m if m is not None else att
        x = x + blk.ls1.gamma * y
        x = x + blk.ls2.gamma * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
    x = vit.norm(x)
    return x[:, 1:].reshape(b, w // 14, h // 14, -1).permute(0, 3, 1, 2), x[:, 0], att


def ref_sinkhorn(s, dustbin, iters=3):
    b, m, n = s.shape
    z = torch.empty(b, m + 1, n, dtype=s.dtype)
    z[:, :m, :n] = s
    z[:, m, :] = dustbin
    norm = -torch.tensor(math.log(n + m))
    log_a, log_b = norm.expand(m + 1).contiguous(), norm.expand(n).contiguous()
    log_a[-1] = log_a[-1] + math.log(n - m)
    log_a, log_b = log_a.expand(b, -1), log_b.expand(b, -1)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iters):
        u = log_a - torch.logsumexp(z + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(z + u.unsqueeze(2), dim=1)
    return torch.exp(z + u.unsqueeze(2) + v.unsqueeze(1) - norm)[:, :-1, :]


def ref_replace_top_values(x):
    vals, idx = torch.sort(x, dim=1, descending=True)
    fill = vals[:, int(0.05 * x.shape[1])]
    for b in range(x.shape[0]):
        x[b, idx[b, :3]] = fill[b]
    return x


def reference_forward(net, img):
    f, t, att = ref_backbone(net.backbone.model, img)
    mask_guide = torch.where(att >= 0.01, att, torch.zeros_like(att))
    agg = net.aggregator
    b, _, h, w = f.shape
    feats, s, tok = agg.cluster_features(f).flatten(2), agg.score(f).flatten(2), agg.token_features(t)
    p = ref_sinkhorn(s, 1 - mask_guide)
    conf = ref_replace_top_values(p.mean(1)).softmax(-1)
    mask = torch.zeros(b, h * w).scatter_(1, torch.topk(conf, 225, dim=-1).indices, 1).view(b, h, w)
    pr = p.unsqueeze(1).repeat(1, 128, 1, 1)
    fr = feats.unsqueeze(2).repeat(1, 1, 64, 1)
    g = torch.cat([F.normalize(tok, dim=-1), F.normalize((fr * pr).sum(dim=-1), dim=1).flatten(1)], dim=-1)
    g = F.normalize(g, dim=-1)
    x0 = net.upconv2(F.relu(net.upconv(f))).permute(0, 2, 3, 1)
    hp, wp = x0.shape[1:3]
    mask_up = F.interpolate(mask[:, None], (hp, wp), mode='nearest')[:, 0].reshape(b, -1)
    flat = x0.reshape(b, hp * wp, 128)
    tokens = [flat[i][mask_up[i] == 1] for i in range(b)]
    first = torch.cat([tokens[0], torch.zeros(3600 - tokens[0].shape[0], 128)])
    local = F.normalize(pad_sequence([first] + tokens[1:], batch_first=True), dim=-1)
    index = [torch.nonzero(mask_up[i] == 1)[:, 0] for i in range(b)]
    return g, local, index


@pytest.fixture(scope='module')
def net() -> FoLNet:
    torch.manual_seed(7)
    n = FoLNet('tiny').eval()
    with torch.no_grad():   # non-trivial LayerScales and a sharper CLS attention, as in trained models
        for blk in n.backbone.model.blocks:
            blk.ls1.gamma.uniform_(0.2, 1.0)
            blk.ls2.gamma.uniform_(0.2, 1.0)
        n.backbone.model.blocks[-1].attn.qkv.weight.mul_(3.0)
    return n


@pytest.mark.parametrize('size', [(322, 322), (504, 504), (308, 392)])
def test_matches_literal_reference(net, size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.inference_mode():
        g_ref, local_ref, index_ref = reference_forward(net, x)
        out = net(x)
        g, local, index, valid = net.forward_fixed(x)
    cos = (g_ref * g).sum(dim=1)
    assert (cos >= 0.99999).all(), cos
    torch.testing.assert_close(g, g_ref, rtol=0, atol=2e-6)
    for b in range(2):
        n = index_ref[b].numel()
        assert torch.equal(index[b, :n], index_ref[b]) and int(valid[b].sum()) == n
        assert torch.equal(out.local_index[b, :n], index_ref[b]) and int(out.local_count[b]) == n
        torch.testing.assert_close(local[b, :n], local_ref[b, :n], rtol=0, atol=2e-6)
    assert local_ref.shape == local.shape == (2, 3600, 128)

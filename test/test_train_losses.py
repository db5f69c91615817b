"""Each FoL training loss against a case computed by hand (fol-method §10)."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from fol_ros.errors import ConfigError
from fol_ros.train import losses as L


def test_multi_similarity_loss_hand_case():
    # places {0,1} and {2,3}; cosine sims: S01=0, S02=.6, S03=.8, S12=.8, S13=.6, S23=.96
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 1])
    # miner (eps .1): anchors 0 and 1 keep their positive (0 - .1 < max neg .8) and both negatives (> min pos 0 - .1);
    # anchors 2 and 3: positive .96 - .1 is not < max neg .8, negatives .6/.8 + .1 are not > .96 -> no pairs, loss 0.
    per_anchor = math.log(1 + math.exp(-0.0)) + math.log(1 + math.exp(50 * 0.6) + math.exp(50 * 0.8)) / 50
    expected = 2 * per_anchor / 4   # pytorch-metric-learning's MeanReducer averages over all anchors
    got = L.multi_similarity_loss(g, labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_multi_similarity_loss_no_hard_pairs_is_zero():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert L.multi_similarity_loss(g, torch.tensor([0, 0, 1, 1])).item() == 0.0


def test_mutual_nn_similarity_hand_case_and_guards():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)    # last row = padding
    d = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.0, 0.0]])
    # sims: d0q0 .8, d0q1 .6, d1q0 0, d1q1 1 -> mutual pairs (q0,d0) .8 and (q1,d1) 1.0
    s = L.mutual_nn_similarity(q, d, 0.7)
    assert s.item() == pytest.approx(0.9)
    s.backward()
    assert torch.allclose(q.grad[0], torch.tensor([0.4, 0.3]))     # d0 / 2
    assert L.mutual_nn_similarity(q, d, 0.85).item() == pytest.approx(1.0)   # a single pair counts (§14 #9)
    empty = L.mutual_nn_similarity(q, d, 1.0)                             # no pair > 1.0: 0, not NaN (§14 #14)
    assert empty.item() == 0.0 and empty.requires_grad


def test_local_triplet_loss_hand_case():
    g = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    a, p, n = L.batch_hard_triplets(g, labels)
    assert p.tolist() == [1, 0, 3, 2] and n.tolist() == [2, 2, 1, 1]
    tok = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0.8, 0, 0.6], [0.8, 0, 0.6]])
    local = torch.cat([tok[:, None], torch.zeros(4, 2, 3)], 1)   # one token + two padding rows
    # anchor 0: sim(0,2)=.8 > .7, sim(0,1)=.6 -> 0: .8; anchors 1..3 contribute 0 (sum, margin 0)
    assert L.local_triplet_loss(g, local, labels).item() == pytest.approx(0.8)


def test_contrast_loss_hand_case():
    feats0 = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]]).view(2, 2, 2)
    feats1 = torch.tensor([[1.0, 0]] * 4).view(2, 2, 2)
    local_sep = torch.stack([feats0, feats1])
    mask = torch.tensor([[1.0, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]]).view(2, 2, 2).requires_grad_()
    # fg0=(1,0) bg0=(0,1); fg1=bg1=(1,0): each image .7*(1-1) + .3*(1-0) = .3
    loss = L.contrast_loss(local_sep, mask, torch.tensor([5, 5]), random.Random(0))
    assert loss.item() == pytest.approx(0.3)
    loss.backward()
    assert mask.grad is not None


def test_patch_to_local_matches_official_grid():
    rows = [L.patch_to_local(r, 23, 89) for r in range(23)]
    assert rows == [2, 6, 10, 14, 17, 21, 25, 29, 33, 37, 41, 44, 48, 52, 56, 60, 64, 68, 72, 75, 79, 83, 87]


def test_pseudo_correspondence_loss_hand_case():
    f_norm = torch.zeros(2, 3, 4)
    f_norm[0, :, 1] = torch.tensor([1.0, 0, 0])
    f_norm[1, :, 0] = torch.tensor([1.0, 0, 0])                       # best overall, but not a candidate
    f_norm[1, :, 1] = F.normalize(torch.tensor([0.9, 0.436, 0]), dim=0)
    f_norm[1, :, 3] = F.normalize(torch.tensor([0.3, 0.954, 0]), dim=0)
    p = torch.zeros(2, 2, 4)
    p[0, 0, 1] = 0.9                                                  # anchor patch 1 -> cluster 0
    p[1, 0] = torch.tensor([0.0, 0.9, 0.05, 0.9])                     # candidates in image 1: patches 1, 3
    mask_guide = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])   # anchors 0, 1; 0 is dropped
    local_all = torch.zeros(2, 5, 5, 2)
    local_all[0, ..., 0] = 1.0
    local_all[1] = torch.tensor([0.6, 0.8])
    local_all.requires_grad_()
    top1 = float(f_norm[0, :, 1] @ f_norm[1, :, 1])                  # ~0.9; top2 ~0.3 -> ratio > 2, kept
    loss = L.pseudo_correspondence_loss(f_norm, p, mask_guide, local_all, torch.tensor([3, 3]))
    assert loss.item() == pytest.approx((1 - 0.6) * top1 * 1e-2, rel=1e-5)
    loss.backward()
    assert local_all.grad[0, 0:3, 3:5].abs().sum() > 0 and local_all.grad[0, 3:].abs().sum() == 0


def test_pseudo_correspondence_rejects_inconsistent_grids():
    with pytest.raises(ConfigError, match='patch grid'):
        L.pseudo_correspondence_loss(torch.zeros(2, 3, 5), torch.zeros(2, 2, 5), torch.zeros(2, 5),
                                     torch.zeros(2, 5, 5, 2), torch.tensor([0, 0]))


def test_objective_combines_terms_with_paper_weights():
    torch.manual_seed(0)
    b, hl = 4, 5
    out = {'g': F.normalize(torch.randn(b, 16), dim=1).requires_grad_(),
           'local': F.normalize(torch.randn(b, 20, 8), dim=-1), 'kl1': torch.tensor(2.0), 'kl2': torch.tensor(4.0),
           'local_sep': F.normalize(torch.randn(b, hl, hl, 8), dim=-1), 'mask_sep': torch.rand(b, hl, hl),
           'ws_info': (F.normalize(torch.randn(b, 6, 4), dim=1), torch.rand(b, 3, 4), torch.randn(b, hl, hl, 8)),
           'mask_guide': torch.rand(b, 4)}
    labels = torch.tensor([0, 0, 1, 1])
    total, parts = L.FoLObjective()(out, labels)
    assert set(parts) == {'ms', 'mnn', 'sa', 'ce', 'pc'} and parts['sa'] == pytest.approx(6.0)
    assert total.item() == pytest.approx(sum(parts.values()) - 6.0 + 5e-3 * 6.0, rel=1e-5)
    total.backward()
    assert out['g'].grad is not None and torch.isfinite(out['g'].grad).all()

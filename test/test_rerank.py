"""FoL re-ranking equals a slow, obviously correct reference (fol-method §9.2 + §14 fixes)."""
import warnings

import numpy as np
import pytest

from fol_ros.records import Candidate
from fol_ros.rerank import mutual_nn_counts, mutual_nn_pairs, rerank


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_pairs(q, c, thr=0.7):
    """Literal reading of §9.2 with python loops: query token j pairs with its best db token i if j is i's best."""
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    pairs = []
    for j in range(len(q)):
        sims_j = [float(c[i] @ q[j]) for i in range(len(c))]
        if not sims_j:
            continue
        i = int(np.argmax(sims_j))
        back = [float(c[i] @ q[jj]) for jj in range(len(q))]
        if int(np.argmax(back)) == j and sims_j[i] > thr:
            pairs.append((j, i))
    return pairs


# both kernels decide rows and columns in numba loops (mutual_nn_jit) or, without numba, in numpy: both run
BOTH_LOOPS = pytest.mark.parametrize('compiled', [True, False], ids=['numba', 'numpy'])


def _related(rng, q, n, frac, noise):
    """A candidate sharing a fraction of the query's tokens (plus noise) and random others."""
    k = min(n, int(len(q) * frac))
    shared = _unit(q[rng.permutation(len(q))[:k]] + noise * rng.normal(size=(k, q.shape[1])))
    return _unit(np.concatenate([shared, rng.normal(size=(n - k, q.shape[1]))])).astype(np.float32)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_counts_equal_reference_on_ragged_random_inputs(seed):
    rng = np.random.default_rng(seed)
    q = _unit(rng.normal(size=(60, 16))).astype(np.float32)
    cands = [_related(rng, q, int(rng.integers(1, 80)), rng.uniform(0, 0.8), rng.uniform(0.05, 0.6))
             for _ in range(12)]
    cands.append(np.zeros((0, 16), np.float32))     # a place without tokens scores 0
    ref = [len(reference_pairs(q, c)) for c in cands]
    assert max(ref) > 5 and min(ref) == 0          # the data exercise both ends
    for budget in (512.0, 1.0, 0.001):             # one chunk; several chunks; query tiling at 1 byte
        got = mutual_nn_counts(q, cands, 0.7, budget_mb=budget)
        assert got.tolist() == ref, budget
    low = [len(reference_pairs(q, c, thr=-0.5)) for c in cands]   # negative threshold: padding must be masked
    assert mutual_nn_counts(q, cands, -0.5, budget_mb=0.01).tolist() == low


def test_fp16_tokens_and_zero_padding_rows_match_reference():
    rng = np.random.default_rng(5)
    q = _unit(rng.normal(size=(40, 32))).astype(np.float16)
    cands = [_related(rng, q.astype(np.float32), 50, 0.5, 0.2).astype(np.float16) for _ in range(4)]
    padded = np.concatenate([q, np.zeros((10, 32), np.float16)])   # official zero padding never counts
    ref = [len(reference_pairs(q.astype(np.float32), c.astype(np.float32))) for c in cands]
    for c in cands:
        c.setflags(write=False)                     # map tokens are read-only memory maps
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert mutual_nn_counts(q, cands).tolist() == ref
    assert mutual_nn_counts(padded, cands).tolist() == ref


def test_threshold_is_strict_and_single_match_counts_one():
    q = np.array([[1.0, 0.0]], np.float32)
    c = np.array([[0.7, np.sqrt(1 - 0.49)]], np.float64)
    at = np.float32(c[0] @ q[0])
    assert mutual_nn_counts(q, [c.astype(np.float32)], threshold=float(at)).tolist() == [0]
    assert mutual_nn_counts(q, [c.astype(np.float32)], threshold=float(at) - 1e-3).tolist() == [1]
    same = np.array([[1.0, 0.0]], np.float32)
    assert mutual_nn_counts(q, [same]).tolist() == [1]                              # §14 #9 fix
    assert mutual_nn_counts(q, [same], single_match_quirk=True).tolist() == [0]     # official quirk A


def test_tied_similarities_take_first_maximum_like_argmax():
    rng = np.random.default_rng(3)
    base = _unit(rng.normal(size=(6, 8))).astype(np.float32)
    q = np.concatenate([base, base[:3]])            # duplicate query tokens: ties along the query axis
    c = np.concatenate([base[2:], base[2:4]])       # duplicate db tokens: ties along the db axis
    ref = reference_pairs(q, c)
    assert mutual_nn_counts(q, [c]).tolist() == [len(ref)]
    assert mutual_nn_counts(q, [c], budget_mb=1e-5).tolist() == [len(ref)]
    iq, ic = mutual_nn_pairs(q, c)
    assert list(zip(iq.tolist(), ic.tolist())) == ref


@pytest.mark.parametrize('seed', [0, 1])
def test_massive_exact_ties_follow_first_maximum(seed):
    """One-hot tokens: every similarity is exactly 0 or 1, so ties are everywhere and exact in any precision."""
    rng = np.random.default_rng(seed)
    eye = np.eye(8, dtype=np.float32)
    q = eye[rng.integers(0, 6, 40)]
    cands = [eye[rng.integers(0, 8, int(n))] for n in rng.integers(1, 30, 6)]
    ref = [len(reference_pairs(q, c)) for c in cands]
    for budget in (512.0, 0.0005):
        assert mutual_nn_counts(q, cands, budget_mb=budget).tolist() == ref
        iq, ic = mutual_nn_pairs(q, cands[0], budget_mb=budget)
        assert list(zip(iq.tolist(), ic.tolist())) == reference_pairs(q, cands[0])


def test_pairs_equal_reference():
    rng = np.random.default_rng(7)
    q = _unit(rng.normal(size=(50, 16))).astype(np.float32)
    c = _related(rng, q, 70, 0.6, 0.3)
    iq, ic = mutual_nn_pairs(q, c)
    assert list(zip(iq.tolist(), ic.tolist())) == reference_pairs(q, c)


def _tie_and_padding_cases():
    """(query, candidates, threshold): ragged random, one-hot (exact ties everywhere), the earlier-row tie of the
    test below, and all-negative similarities (padding must never win)."""
    rng = np.random.default_rng(0)
    q = _unit(rng.normal(size=(60, 16))).astype(np.float32)
    yield q, [_related(rng, q, int(n), 0.6, 0.2) for n in (1, 63, 65, 130)] + [np.zeros((0, 16), np.float32)], 0.7
    eye = np.eye(8, dtype=np.float32)
    yield eye[rng.integers(0, 6, 40)], [eye[rng.integers(0, 8, int(n))] for n in (1, 29, 70, 140)], 0.7
    yield (np.array([[1, 0, 0], [0.8, 0.6, 0]], np.float32), [np.array([[0.8, 0.6, 0], [0.8, 0, 0.6]], np.float32)],
           0.7)
    pos = _unit(np.abs(rng.normal(size=(70, 8)))).astype(np.float32)
    yield pos, [-_unit(np.abs(rng.normal(size=(n, 8)))).astype(np.float32) for n in (1, 63, 65, 130)], -2.0


@BOTH_LOOPS
def test_fp32_kernel_equals_reference_with_and_without_numba(compiled):
    """The fp32 tiles keep each column's first best row while folding (numba) or recompute those columns (numpy):
    the reference pairs either way, across tile boundaries (64-row tiles at the small budget)."""
    import torch

    from fol_ros import mutual_nn
    cpu = torch.device('cpu')
    for q, cands, thr in _tie_and_padding_cases():
        ref = [reference_pairs(q, c, thr) for c in cands]
        for budget in (512.0, 0.001):
            got = mutual_nn.match(q, cands, thr, budget, cpu, compiled=compiled)
            assert [list(zip(a.tolist(), b.tolist())) for a, b in got.pairs] == ref, (thr, budget)
            assert got.counts.tolist() == [len(r) for r in ref]
    same = np.array([[1.0, 0.0]], np.float32)
    assert mutual_nn.match(same, [same], 0.7, 512.0, cpu, True, compiled=compiled).counts.tolist() == [0]


def test_rerank_is_stable_with_ties_broken_by_global_rank():
    scores = np.array([0, 4, 0, 4, 9, 4, 0])
    assert rerank(np.arange(7), scores).tolist() == [4, 1, 3, 5, 0, 2, 6]
    assert rerank(np.arange(7), np.zeros(7)).tolist() == list(range(7))    # all-zero keeps the global order
    cands = [Candidate(place_id=10 + i, retrieval_rank=r, global_similarity=0.0) for i, r in enumerate([2, 0, 1])]
    assert rerank(cands, [1, 1, 1]).tolist() == [1, 2, 0]


def test_pairs_from_the_counting_pass_equal_mutual_nn_pairs():
    from fol_ros.rerank import mutual_nn_match
    rng = np.random.default_rng(5)

    def tokens(n):
        x = rng.standard_normal((n, 16)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    query = tokens(60)
    cands = [np.concatenate([query[:20] + 0.05 * tokens(20), tokens(n)]) for n in (5, 40, 0)]
    cands = [c / np.linalg.norm(c, axis=1, keepdims=True) for c in cands]
    found = mutual_nn_match(query, cands, 0.7, budget_mb=0.01)
    assert len(found.pairs) == 3 and found.counts.min() > 0
    for cand, (iq, ic), count in zip(cands, found.pairs, found.counts):
        ref_q, ref_c = mutual_nn_pairs(query, cand, 0.7)
        assert len(iq) == count
        np.testing.assert_array_equal(iq, ref_q)
        np.testing.assert_array_equal(ic, ref_c)


def test_an_earlier_row_with_an_equal_value_takes_the_column_even_when_its_own_best_is_elsewhere():
    """Candidate rows 0 and 1 reach exactly 0.8 with query token e1; row 0's own best is another query token, so
    the column argmax of e1 is row 0 (first maximum) and (e1, row 1) is NOT mutual, although row 1's best is e1
    and its value equals the column maximum. A value-only mutual test would count it."""
    q = np.array([[1, 0, 0], [0.8, 0.6, 0]], np.float32)
    c = np.array([[0.8, 0.6, 0], [0.8, 0, 0.6]], np.float32)
    assert float(c[0] @ q[0]) == float(c[1] @ q[0]) == np.float32(0.8)      # an exact tie in every precision
    ref = reference_pairs(q, c)
    assert ref == [(1, 0)]
    assert mutual_nn_counts(q, [c]).tolist() == [1]
    iq, ic = mutual_nn_pairs(q, c)
    assert list(zip(iq.tolist(), ic.tolist())) == ref


def test_padding_never_wins_a_row_or_column_whose_real_similarities_are_all_negative():
    """All similarities < 0: zero padding rows/columns (similarity 0) would beat every real token if unmasked."""
    rng = np.random.default_rng(11)
    q = _unit(np.abs(rng.normal(size=(70, 8)))).astype(np.float32)        # positive orthant
    cands = [-_unit(np.abs(rng.normal(size=(n, 8)))).astype(np.float32) for n in (1, 63, 65, 130)]
    ref = [len(reference_pairs(q, c, thr=-2.0)) for c in cands]
    assert min(ref) > 0
    for budget in (512.0, 0.001):
        assert mutual_nn_counts(q, cands, -2.0, budget_mb=budget).tolist() == ref
        assert mutual_nn_counts(q, cands, 0.0, budget_mb=budget).tolist() == [0] * len(cands)


def _official_counts(q, cands, pad=3600, thr=0.7):
    """fol-method §9.2 verbatim in torch fp32: zero-padded K x pad x pad matrix, both argmaxes, elementwise
    threshold."""
    import torch
    fm1 = torch.zeros((pad, q.shape[1]))
    fm1[:len(q)] = torch.from_numpy(q.astype(np.float32))
    fm2 = torch.zeros((len(cands), pad, q.shape[1]))
    for i, c in enumerate(cands):
        fm2[i, :len(c)] = torch.from_numpy(c.astype(np.float32))
    m = torch.matmul(fm2, fm1.T)
    max1, max2 = m.argmax(dim=1), m.argmax(dim=2)
    valid = max2.gather(1, max1) == torch.arange(pad)[None]
    out = []
    for k in range(len(cands)):
        idx1 = torch.nonzero(valid[k]).squeeze()
        sims = (fm1[idx1] * fm2[k, max1[k, idx1]]).sum(-1)
        out.append(int((sims > thr).sum()))
    return out


def test_counts_equal_the_official_formulation_on_real_corridor_tokens(corridor_dir):
    """Real ViT-S/14 tokens at 322 (fp16, as the map stores them): identical counts to the official fp32 code."""
    import cv2

    from fol_ros.encode.torch_engine import TorchEncoder
    from fol_ros.errors import CheckpointError
    from fol_ros.model.checkpoint import load_checkpoint
    from fol_ros.model.weights import ensure_default_checkpoint
    try:
        net, info = load_checkpoint(ensure_default_checkpoint())
    except CheckpointError as exc:
        pytest.skip(f'default ViT-S/14 weights unavailable: {exc}')
    paths = [corridor_dir / 'query' / '0000040.jpg'] + [corridor_dir / 'ref' / f'{i:07d}.jpg' for i in (40, 41, 90)]
    images = [cv2.imread(str(p))[:, :, ::-1].copy() for p in paths]
    tokens = [e.local.astype(np.float16) for e in TorchEncoder(net, info, max_batch=4).encode(images)]
    q, cands = tokens[0], tokens[1:]
    assert all(len(c) % 64 for c in cands) or len(q) % 64     # ragged, unaligned lengths exercise the padding
    official = _official_counts(q, cands)
    assert min(official) > 20
    for kernel in ('fp32', 'bf16'):
        assert mutual_nn_counts(q, cands, kernel=kernel).tolist() == official, kernel
    assert mutual_nn_counts(q, cands, budget_mb=1.0, kernel='fp32').tolist() == official    # 64-row tiles
    found = {compiled: _fp32_and_bf16(q, cands, compiled=compiled) for compiled in (True, False)}
    for fp32, bf16 in found.values():
        _assert_same(fp32, bf16)
    fp32 = found[True][0]
    _assert_same(fp32, found[False][0])                                   # numba and numpy fp32 kernels
    import torch

    from fol_ros import mutual_nn
    _assert_same(fp32, mutual_nn.match_dense(q, cands, 0.7, 512.0, torch.device('cpu')))   # the GPU path


# --- the bf16 screen (fol_ros.mutual_nn_bf16): the fp32 counts and pairs, whatever the CPU ------------------------

def _fp32_and_bf16(q, cands, thr=0.7, compiled=None):
    import torch

    from fol_ros import mutual_nn, mutual_nn_bf16
    dev = torch.device('cpu')
    with torch.inference_mode():
        return (mutual_nn.match(q, cands, thr, 512.0, dev, compiled=compiled),
                mutual_nn_bf16.match(q, cands, thr, 512.0, dev, compiled=compiled))



def _assert_same(a, b):
    assert a.counts.tolist() == b.counts.tolist()
    for (qa, ca), (qb, cb) in zip(a.pairs, b.pairs):
        assert qa.tolist() == qb.tolist() and ca.tolist() == cb.tolist()


@pytest.fixture
def decisions(monkeypatch):
    """Counts how many rows and columns the bf16 screen had to hand to the fp32 GEMM (near ties)."""
    from fol_ros import mutual_nn, mutual_nn_bf16
    seen = {'rows': 0, 'cols': 0}
    rows, cols = mutual_nn_bf16._gemm_row_argmax, mutual_nn._first_argmax_of_columns

    def row_wrap(cand, q, r, n):
        seen['rows'] += len(r)
        return rows(cand, q, r, n)

    def col_wrap(cand, lc, q, c, chunk):
        seen['cols'] += len(c)
        return cols(cand, lc, q, c, chunk)
    monkeypatch.setattr(mutual_nn_bf16, '_gemm_row_argmax', row_wrap)
    monkeypatch.setattr(mutual_nn, '_first_argmax_of_columns', col_wrap)
    return seen


@BOTH_LOOPS
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_bf16_screen_equals_fp32_on_ragged_random_inputs(seed, compiled):
    rng = np.random.default_rng(seed)
    q = _unit(rng.normal(size=(150, 128))).astype(np.float32)
    cands = [_related(rng, q, int(rng.integers(1, 200)), rng.uniform(0, 0.9), rng.uniform(0.05, 1.0) / np.sqrt(128))
             for _ in range(8)] + [np.zeros((0, 128), np.float32)]
    fp32, bf16 = _fp32_and_bf16(q, cands, compiled=compiled)
    assert fp32.counts.max() > 20 and (fp32.counts == 0).sum() >= 1
    _assert_same(fp32, bf16)
    assert bf16.counts.tolist() == [len(reference_pairs(q, c)) for c in cands]


@BOTH_LOOPS
def test_bf16_screen_is_exact_on_adversarial_near_ties(decisions, compiled):
    """Candidates whose similarities differ from each other by 1e-3 .. 1e-8 (far inside bf16's error), exact
    duplicates, and pairs whose cosine sits within float rounding of the threshold: the result must be the fp32
    one, and the near ties must actually have gone to the fp32 GEMM."""
    rng = np.random.default_rng(4)
    q = _unit(rng.normal(size=(256, 128))).astype(np.float32)
    cands = []
    for eps in (1e-3, 1e-5, 1e-7, 0.0):
        base = q[rng.permutation(256)[:120]]
        twins = [_unit(base + eps * rng.normal(size=base.shape)) for _ in range(2)]
        cands.append(np.concatenate(twins + [_unit(rng.normal(size=(30, 128)))]).astype(np.float32))
    q_dup = np.concatenate([q, q[:40] + 1e-7 * rng.normal(size=(40, 128)).astype(np.float32)])
    # cosine exactly around 0.7 with q[0]: a + b with a along q[0]
    ortho = _unit(rng.normal(size=(64, 128)) - (rng.normal(size=(64, 128)) @ q[0])[:, None] * q[0])
    for cos in (0.7 - 1e-7, 0.7, 0.7 + 1e-7):
        ortho_part = ortho - (ortho @ q[0])[:, None] * q[0]
        ortho_part = _unit(ortho_part)
        cands.append((cos * q[0] + np.sqrt(1 - cos ** 2) * ortho_part).astype(np.float32))
    for query in (q, q_dup):
        fp32, bf16 = _fp32_and_bf16(query, cands, compiled=compiled)
        _assert_same(fp32, bf16)
    assert fp32.counts[:4].min() > 20
    assert decisions['rows'] > 50 and decisions['cols'] > 10     # the fp32 fallbacks ran


@BOTH_LOOPS
def test_bf16_screen_on_one_hot_tokens_and_fallbacks(compiled):
    """Exact ties everywhere (one-hot: every similarity 0 or 1 in every precision); quirk A and thresholds <= 0.1
    take the fp32 path, with the same public results."""
    rng = np.random.default_rng(2)
    eye = np.eye(8, dtype=np.float32)
    q = eye[rng.integers(0, 6, 40)]
    cands = [eye[rng.integers(0, 8, int(n))] for n in rng.integers(1, 30, 6)]
    fp32, bf16 = _fp32_and_bf16(q, cands, compiled=compiled)
    _assert_same(fp32, bf16)
    assert bf16.counts.tolist() == [len(reference_pairs(q, c)) for c in cands]
    same = np.array([[1.0, 0.0]], np.float32)
    assert mutual_nn_counts(same, [same], single_match_quirk=True, kernel='bf16').tolist() == [0]
    assert mutual_nn_counts(q, cands, 0.05, kernel='bf16').tolist() == mutual_nn_counts(q, cands, 0.05,
                                                                                       kernel='fp32').tolist()


def test_without_numba_reranking_warns_and_decides_in_numpy():
    """A robot without numba (or without a writable numba cache) still re-ranks, with the same pairs."""
    import pathlib
    import subprocess
    import sys
    code = """
import sys
sys.modules['numba'] = None          # as if numba were not installed
import logging
logging.basicConfig()
import numpy as np
import torch
from fol_ros import mutual_nn, mutual_nn_bf16 as m
assert mutual_nn.JIT is None
rng = np.random.default_rng(0)
q = rng.normal(size=(70, 16)).astype(np.float32)
q /= np.linalg.norm(q, axis=1, keepdims=True)
print(m.match(q, [q[:50], q[20:]], 0.7, 512.0).counts.tolist(),
      mutual_nn.match(q, [q[:50], q[20:]], 0.7, 512.0, torch.device('cpu')).counts.tolist())
try:
    m.match(q, [q], 0.7, 512.0, compiled=True)
except ImportError as exc:
    print('refused:', exc)
"""
    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == '[50, 50] [50, 50]'
    assert 'refused: the compiled re-ranking loops need numba' in out.stdout
    assert 're-ranking without numba' in out.stderr and 'python3-numba' in out.stderr


def test_bf16_kernel_choice():
    import torch

    from fol_ros.errors import ConfigError
    from fol_ros.mutual_nn_bf16 import cpu_has_fast_bf16
    from fol_ros.rerank import use_bf16
    cpu = torch.device('cpu')
    assert use_bf16('auto', cpu) == cpu_has_fast_bf16()
    assert use_bf16('bf16', cpu) and not use_bf16('fp32', cpu) and not use_bf16('bf16', torch.device('cuda'))
    with pytest.raises(ConfigError, match='auto, fp32 or bf16'):
        use_bf16('fp16', cpu)


def test_dense_grouped_kernel_for_gpus_equals_the_tiled_one():
    """mutual_nn.match_dense (what CUDA runs: whole [G, Lc, Lq] matrices, few launches) gives the tiled kernel's
    pairs on the CPU: random, one-hot (exact ties), all-negative and empty candidates, one or many per group."""
    import torch

    from fol_ros import mutual_nn
    rng = np.random.default_rng(6)
    q = _unit(rng.normal(size=(90, 32))).astype(np.float32)
    cands = [_related(rng, q, int(n), rng.uniform(0, 0.8), rng.uniform(0.05, 0.6)) for n in rng.integers(1, 150, 7)]
    cands += [np.zeros((0, 32), np.float32), -_unit(np.abs(rng.normal(size=(20, 32)))).astype(np.float32)]
    eye = np.eye(32, dtype=np.float32)
    cands += [eye[rng.integers(0, 32, 40)]]
    q_ties = np.concatenate([q, eye[:8], eye[:4]])
    cpu = torch.device('cpu')
    for query in (q, q_ties):
        for thr in (0.7, -2.0):
            tiled = mutual_nn.match(query, cands, thr, 512.0, cpu)
            assert tiled.counts.max() > 5
            for budget in (512.0, 0.01):     # all candidates in one group; one candidate per group
                _assert_same(tiled, mutual_nn.match_dense(query, cands, thr, budget, cpu))

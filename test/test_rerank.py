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

"""solution.ensembles.fusion against float64 definitions (tests/oracles.py), exact on integer or dyadic features."""

import numpy as np
import pytest
import torch
from oracles import dual_softmax, fused, qb_norm, stable_topk

from solution.ensembles.fusion import check_weights, fit_temperature, forward_select, fusion_chunk, rerank_topk


def _int_members(rng, n_queries, n_gallery, dims=(3, 5)):
    """Integer features, each member its own width; ties for sure: the last six gallery rows repeat the first six."""
    members = []
    for d in dims:
        g = rng.integers(-2, 3, (n_gallery, d)).astype(np.float32)
        g[-6:] = g[:6]
        members.append((rng.integers(-2, 3, (n_queries, d)).astype(np.float32), g))
    return members


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
@pytest.mark.parametrize("k", [1, 5, 17])
def test_chunked_fusion_equals_the_exact_ranking_with_ties(chunk, k):
    rng = np.random.default_rng(chunk * 100 + k)
    members = _int_members(rng, 13, 17)
    want_s, want_i = stable_topk(fused(members, [1, 3]), k)
    assert ((fused(members, [1, 3]) == want_s[:, -1:]).sum(axis=1) > 1).any()  # some row ties at its k-th place
    for dtype in (torch.float32, torch.float64):  # quarters of small integers: exact in float32 too
        got_s, got_i = rerank_topk(members, k, [1, 3], chunk_size=chunk, dtype=dtype)
        assert np.array_equal(got_i, want_i) and np.array_equal(got_s, want_s)


@pytest.mark.parametrize("norm, temperature", [("zscore", 1.0), ("softmax", 0.5), ("softmax", 4.0)])
def test_normalised_fusion_matches_the_definition(norm, temperature):
    rng = np.random.default_rng(3)
    members = _int_members(rng, 11, 15)
    members[0][0][0] = 0.0  # a constant row of scores
    want = fused(members, [2, 1], norm, temperature)
    kw = dict(norm=norm, norm_temperature=temperature, chunk_size=4, dtype=torch.float64)
    got_s, got_i = rerank_topk(members, 6, [2, 1], **kw)
    assert np.array_equal(got_i, stable_topk(want, 6)[1])
    np.testing.assert_allclose(got_s, stable_topk(want, 6)[0], rtol=1e-12, atol=1e-12)


def test_zscore_of_constant_rows_is_zero_and_of_exact_rows_exact():
    """A constant row of 0.1 has no exact mean in floating point: its range, not its std, tells it is constant."""
    assert np.mean([0.1] * 3) != 0.1
    s, i = rerank_topk([(np.array([[0.1]]), np.ones((3, 1)))], 3, norm="zscore", dtype=torch.float64)
    assert np.array_equal(s, np.zeros((1, 3))) and i.tolist() == [[0, 1, 2]]
    exact = [(np.array([[1.0]]), np.array([[0.0], [0.0], [4.0], [4.0]]))]
    s, i = rerank_topk(exact, 4, norm="zscore", dtype=torch.float64)
    assert s.tolist() == [[1.0, 1.0, -1.0, -1.0]] and i.tolist() == [[2, 3, 0, 1]]


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_dual_softmax_matches_the_definition(chunk):
    rng = np.random.default_rng(chunk)
    q, g, bank = rng.normal(size=(10, 4)), rng.normal(size=(14, 4)), rng.normal(size=(6, 4))
    s, temp = q @ g.T, 0.3
    for want, bank_arg in ((dual_softmax(s, s, temp), None), (dual_softmax(s, bank @ g.T, temp), [(bank, g)])):
        kw = dict(method="dual_softmax", temperature=temp, bank=bank_arg, chunk_size=chunk, dtype=torch.float64)
        got_s, got_i = rerank_topk([(q, g)], 5, **kw)
        assert np.array_equal(got_i, stable_topk(want, 5)[1])
        np.testing.assert_allclose(got_s, stable_topk(want, 5)[0], rtol=1e-12)


@pytest.mark.parametrize("bank_topk", [None, 1, 2])
@pytest.mark.parametrize("chunk", [2, 64])
def test_qb_norm_matches_the_reference_procedure(bank_topk, chunk):
    rng = np.random.default_rng(11)
    g, bank = rng.normal(size=(20, 5)), rng.normal(size=(4, 5))
    q = np.vstack([rng.normal(size=(12, 5)), bank[:2] * 2])  # the last two are normalised for sure
    want = qb_norm(q @ g.T, bank @ g.T, 0.5, bank_topk)
    if bank_topk is not None:
        assert (want == q @ g.T).all(axis=1).any()  # some rows keep their fused scores
    kw = dict(method="qb_norm", temperature=0.5, bank=[(bank, g)], bank_topk=bank_topk, chunk_size=chunk)
    got_s, got_i = rerank_topk([(q, g)], 6, dtype=torch.float64, **kw)
    assert np.array_equal(got_i, stable_topk(want, 6)[1])
    np.testing.assert_allclose(got_s, stable_topk(want, 6)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["zscore", "softmax", "none"])
@pytest.mark.parametrize("method", ["none", "dual_softmax", "qb_norm"])
def test_temperature_zero_is_no_reranking_and_inputs_are_left_alone(norm, method):
    """Fusion works in its own blocks: features given (arrays or tensors already in the working dtype, which
    could be shared) come back untouched, chunked or not; temperature 0 gives the plain fused ranking."""
    rng = np.random.default_rng(5)
    members = _int_members(rng, 9, 12)
    bank = [(b, g) for (b, _), (_, g) in zip(_int_members(rng, 5, 12), members)]
    tensors = [tuple(torch.tensor(x, dtype=torch.float64) for x in m) for m in members]
    saved = [tuple(x.copy() for x in m) for m in members]
    kw = dict(norm=norm, norm_temperature=0.5, bank=bank, dtype=torch.float64)
    plain = rerank_topk(members, 4, [1, 2], norm=norm, norm_temperature=0.5, dtype=torch.float64)
    off = rerank_topk(members, 4, [1, 2], method=method, temperature=0.0, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(off, plain))
    got = [
        rerank_topk(m, 4, [1, 2], method=method, temperature=0.5, chunk_size=c, **kw)[1]
        for m in (members, tensors)
        for c in (2, 100)
    ]
    assert all(np.array_equal(g, got[0]) for g in got)  # chunking changes nothing
    for m, t, s in zip(members, tensors, saved):
        assert all(np.array_equal(a, b) and np.array_equal(c.numpy(), b) for a, c, b in zip(m, t, s))


BAD_WEIGHTS = [([1, -1], "finite, >= 0"), ([0, 0], "positive sum"), ([np.nan, 1], "finite"), ([np.inf, 1], "finite")]


@pytest.mark.parametrize("weights, match", [*BAD_WEIGHTS, ([1, 1, 1], "one weight")])
def test_bad_weights_raise(weights, match):
    with pytest.raises(ValueError, match=match):
        check_weights(weights, 2)
    with pytest.raises(ValueError, match=match):
        rerank_topk([(np.zeros((2, 3)), np.eye(3))] * 2, 2, weights)


def test_bad_arguments_raise():
    s = [(np.zeros((2, 3)), np.eye(3))]
    assert np.array_equal(check_weights([1, 3], 2), [0.25, 0.75])
    for kwargs, match in [
        (dict(method="qb_norm", temperature=0.1), "bank"),
        (dict(method="dual_softmax", temperature=-1.0), "temperature"),
        (dict(method="bogus", temperature=1.0), "re-ranker"),
        (dict(norm="softmax", norm_temperature=0.0), "temperature > 0"),
        (dict(norm="l2"), "unknown normalisation"),
    ]:
        with pytest.raises(ValueError, match=match):
            rerank_topk(s, 2, **kwargs)


def test_forward_selection_with_replacement_reaches_a_repeated_member():
    target = np.array([0.5, 0.25, 0.25])
    counts, score, trajectory = forward_select(lambda w: -float(((w - target) ** 2).sum()), 3)
    assert counts.tolist() == [2, 1, 1] and score == 0.0
    assert [r["member"] for r in trajectory if r["accepted"]] == [0, 1, 2, 0]
    assert len(trajectory) == 3 * 5  # four accepted rounds and the one that found no improvement
    assert forward_select(lambda w: 1.0, 3, max_rounds=5)[0].tolist() == [1, 0, 0]  # flat: nothing strictly improves
    assert forward_select(lambda w: float(w[1]), 2, max_rounds=0)[0].tolist() == [0, 1]


def test_fit_temperature_picks_the_argmax_and_the_earliest_tie():
    assert fit_temperature(lambda t: -((t - 0.1) ** 2), (0.0, 0.05, 0.1, 0.5))[0] == 0.1
    best, records = fit_temperature(lambda t: 1.0, (0.0, 0.5))
    assert best == 0.0 and [r["temperature"] for r in records] == [0.0, 0.5]


def test_fusion_chunk_keeps_the_working_set_within_the_budget():
    for gallery, budget in ((29_806, 128), (10, 1), (10**9, 128)):
        for norm, blocks in (("zscore", 2), ("none", 2), ("softmax", 3)):
            chunk = fusion_chunk(gallery, budget, norm)
            assert chunk >= 1 and (chunk == 1 or chunk * gallery * 4 * blocks <= budget * 2**20)
    assert fusion_chunk(29_806, 128) == 128 * 2**20 // (2 * 4 * 29_806)

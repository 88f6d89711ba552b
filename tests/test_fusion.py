"""Exact oracles for solution.fusion: float64 brute force on integer (or dyadic) scores, definitions."""

import numpy as np
import pytest
import torch

from solution.ensembles.fusion import (
    Scores,
    check_weights,
    dual_softmax,
    fit_temperature,
    forward_select,
    fuse,
    fused_topk,
    fusion_chunk,
    gold_rows,
    held_out_recall,
    inverted_softmax,
    rerank_topk,
    softmax,
    zscore,
)
from solution.retrieval.metrics import topk


def _stable_topk(f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: a stable descending sort of every row (ties to the lower index)."""
    order = np.argsort(-f, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(f, order, 1), order


def _int_members(rng, n_queries, n_gallery, dims=(3, 5), low=-2, high=3):
    """Integer-valued features, each member its own dimension; ties for sure: the last six gallery
    rows repeat the first six in every member."""
    members = []
    for d in dims:
        g = rng.integers(low, high, (n_gallery, d)).astype(np.float32)
        g[-6:] = g[:6]
        members.append((rng.integers(low, high, (n_queries, d)).astype(np.float32), g))
    return members


def _halves_case():
    """8 queries, 24 images, gold q -> image q. Member A ranks the gold first on queries 0-3 and below
    ten wrong images (8..17) on queries 4-7; member B the reverse. Features: score rows against an
    identity gallery (B padded to another dimension)."""
    n_q, n_g = 8, 24
    a, b = np.zeros((n_q, n_g)), np.zeros((n_q, n_g))
    for q in range(n_q):
        right, wrong = (a, b) if q < 4 else (b, a)
        right[q, q] = 3
        wrong[q, q] = -1
        wrong[q, 8:18] = 1
    pad = np.arange(n_q * 3).reshape(n_q, 3)
    member_a = (a, np.eye(n_g))
    member_b = (np.hstack([b, pad]), np.hstack([np.eye(n_g), np.zeros((n_g, 3))]))
    return [member_a, member_b], [{q} for q in range(n_q)]


def test_zscore_constant_row_is_zero_and_exact_rows():
    s = np.array([[0.1, 0.1, 0.1, 0.1], [0, 0, 4, 4], [-7, -7, -7, -7], [1, 3, 1, 3]], dtype=np.float64)
    out = zscore(s)
    assert np.array_equal(out, [[0, 0, 0, 0], [-1, -1, 1, 1], [0, 0, 0, 0], [-1, 1, -1, 1]])
    t = zscore(torch.tensor(s))
    assert torch.is_tensor(t) and np.array_equal(t.numpy(), out)


def test_softmax_definition():
    s = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    for temp in (0.5, 1.0, 4.0):
        e = np.exp(s / temp)
        np.testing.assert_allclose(softmax(s, temp), e / e.sum(1, keepdims=True), rtol=1e-15)
    assert np.array_equal(softmax(s, 1.0)[1], [1 / 3] * 3)
    with pytest.raises(ValueError, match="temperature"):
        softmax(s, 0.0)


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1, -1], ">= 0"),
        ([0, 0], "positive sum"),
        ([-1, 1], ">= 0"),
        ([np.nan, 1], "finite"),
        ([np.inf, 1], "finite"),
        ([1, 1, 1], "one weight"),
    ],
)
def test_bad_weights_raise(weights, match):
    s = np.zeros((2, 3))
    with pytest.raises(ValueError, match=match):
        check_weights(weights, 2)
    with pytest.raises(ValueError, match=match):
        fuse([s, s], weights)
    with pytest.raises(ValueError, match=match):
        fused_topk([s, s], 2, weights)


def test_weights_normalised():
    assert np.array_equal(check_weights([1, 3], 2), [0.25, 0.75])
    s1, s2 = np.array([[4.0, 8.0]]), np.array([[0.0, -4.0]])
    assert np.array_equal(fuse([s1, s2], [1, 3]), [[1.0, -1.0]])


def test_two_members_right_on_disjoint_halves_fuse_to_both():
    members, gold = _halves_case()
    assert held_out_recall([members[0]], gold) == 50.0
    assert held_out_recall([members[1]], gold) == 50.0
    assert held_out_recall(members, gold) == 100.0
    scores, idx = fused_topk(members, 1, chunk_size=3)
    assert np.array_equal(idx[:, 0], np.arange(8)) and np.array_equal(scores[:, 0], np.ones(8))  # (3 - 1) / 2
    sel = forward_select(lambda w: held_out_recall(members, gold, w), 2)
    assert sel.chosen == [0, 1] and np.array_equal(sel.counts, [1, 1]) and sel.score == 100.0
    assert np.array_equal(sel.weights, [0.5, 0.5])


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
@pytest.mark.parametrize("k", [1, 5, 17])
def test_chunked_fused_topk_equals_bruteforce_with_ties(chunk, k):
    rng = np.random.default_rng(chunk * 100 + k)
    members = _int_members(rng, 13, 17)
    exact = sum(w * (q.astype(np.float64) @ g.T.astype(np.float64)) for w, (q, g) in zip((0.25, 0.75), members))
    want_s, want_i = _stable_topk(exact, k)
    assert ((exact == want_s[:, -1:]).sum(axis=1) > 1).any()  # some row has a tie at its k-th place
    got_s, got_i = fused_topk(members, k, [1, 3], chunk_size=chunk)
    assert np.array_equal(got_i, want_i) and np.array_equal(got_s, want_s)
    got_s, got_i = fused_topk(members, k, [1, 3], chunk_size=chunk, dtype=torch.float64)
    assert np.array_equal(got_i, want_i) and np.array_equal(got_s, want_s)


def test_single_member_fused_topk_matches_metrics_topk():
    rng = np.random.default_rng(7)
    ((q, g),) = _int_members(rng, 20, 30, dims=(4,))
    want_s, want_i = topk(q, g, 10, chunk_size=7)
    got_s, got_i = fused_topk([(q, g)], 10, chunk_size=5)
    assert np.array_equal(got_i, want_i) and np.array_equal(got_s, want_s)


def test_zscore_fusion_keeps_the_raw_order_of_one_member_and_matches_definition():
    rng = np.random.default_rng(3)
    ((q, g),) = _int_members(rng, 11, 15, dims=(3,))
    raw = q.astype(np.float64) @ g.T.astype(np.float64)
    _, want_i = _stable_topk(raw, 6)
    mean, std = raw.mean(1, keepdims=True), raw.std(1, keepdims=True)
    z = np.where(std > 0, (raw - mean) / np.where(std > 0, std, 1), 0)
    got_s, got_i = fused_topk([(q, g)], 6, norm="zscore", chunk_size=4, dtype=torch.float64)
    assert np.array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, np.take_along_axis(z, want_i, 1), rtol=1e-12, atol=1e-12)


def _bruteforce_lse(bank: np.ndarray, temp: float) -> np.ndarray:
    return np.log(np.exp(bank / temp).sum(axis=0))


def test_dual_softmax_temperature_zero_is_no_reranking():
    rng = np.random.default_rng(0)
    members = _int_members(rng, 9, 12)
    s = fuse(members, [1, 1])
    assert np.array_equal(dual_softmax(s, 0.0), s)
    plain = fused_topk(members, 12, chunk_size=4)
    reranked = rerank_topk(members, 12, method="dual_softmax", temperature=0.0, chunk_size=4)
    assert all(np.array_equal(x, y) for x, y in zip(plain, reranked))
    assert np.array_equal(inverted_softmax(s, s[:3], 0.0), s)


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_dual_softmax_matches_definition(chunk):
    rng = np.random.default_rng(chunk)
    q, g, bank = rng.normal(size=(10, 4)), rng.normal(size=(14, 4)), rng.normal(size=(6, 4))
    s, b, temp = q @ g.T, bank @ g.T, 0.3
    want_self = s * np.exp(s / temp) / np.exp(s / temp).sum(axis=0)  # bank = the queries themselves
    want_bank = s * np.exp(s / temp - _bruteforce_lse(b, temp))
    np.testing.assert_allclose(dual_softmax(s, temp), want_self, rtol=1e-12)
    np.testing.assert_allclose(dual_softmax(s, temp, b), want_bank, rtol=1e-12)
    for want, bank_arg in ((want_self, None), (want_bank, [(bank, g)])):
        got_s, got_i = rerank_topk(
            [(q, g)], 5, method="dual_softmax", temperature=temp, bank=bank_arg, chunk_size=chunk, dtype=torch.float64
        )
        want_s, want_i = _stable_topk(want, 5)
        assert np.array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-12)


def _qb_norm_bruteforce(s, b, temp, bank_topk):
    """QB-Norm's reference procedure: active = union of the bank's top-k; normalise a row when its top-1 is active."""
    ratio = np.exp(s / temp) / np.exp(b / temp).sum(axis=0)
    if bank_topk is None:
        return np.log(ratio), np.ones(len(s), bool)
    active = set(np.argsort(-b, axis=1, kind="stable")[:, :bank_topk].flatten().tolist())
    gate = np.array([int(np.argmax(row)) in active for row in s])
    return np.where(gate[:, None], np.log(ratio), s), gate


@pytest.mark.parametrize("bank_topk", [None, 1, 2])
@pytest.mark.parametrize("chunk", [2, 64])
def test_qb_norm_matches_reference_procedure(bank_topk, chunk):
    rng = np.random.default_rng(11)
    g, bank = rng.normal(size=(20, 5)), rng.normal(size=(4, 5))
    q = np.vstack([rng.normal(size=(12, 5)), bank[:2] * 2])  # the last two are gated for sure
    s, b, temp = q @ g.T, bank @ g.T, 0.5
    want, gate = _qb_norm_bruteforce(s, b, temp, bank_topk)
    if bank_topk is not None:
        assert gate.any() and not gate.all()
    np.testing.assert_allclose(inverted_softmax(s, b, temp, bank_topk), want, rtol=1e-12, atol=1e-12)
    got_s, got_i = rerank_topk(
        [(q, g)],
        6,
        method="qb_norm",
        temperature=temp,
        bank=[(bank, g)],
        bank_topk=bank_topk,
        chunk_size=chunk,
        dtype=torch.float64,
    )
    want_s, want_i = _stable_topk(want, 6)
    assert np.array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-12, atol=1e-12)


def test_qb_norm_needs_a_bank_and_a_valid_temperature():
    s = np.zeros((2, 3))
    with pytest.raises(ValueError, match="bank"):
        rerank_topk([s], 2, method="qb_norm", temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        rerank_topk([s], 2, method="dual_softmax", temperature=-1.0)
    with pytest.raises(ValueError, match="re-ranker"):
        rerank_topk([s], 2, method="bogus", temperature=1.0)


@pytest.mark.parametrize("seed", range(4))
def test_forward_selection_never_below_its_best_member(seed):
    rng = np.random.default_rng(seed)
    n_members, n_q, n_g = 4, 30, 25
    members = [rng.normal(size=(n_q, n_g)) for _ in range(n_members)]
    gold = [set(rng.choice(n_g, size=int(rng.integers(1, 3)), replace=False).tolist()) for _ in range(n_q)]

    def evaluate(w):
        return held_out_recall(members, gold, w, norm="zscore", dtype=torch.float64)

    singles = [evaluate(np.eye(n_members)[m]) for m in range(n_members)]
    sel = forward_select(evaluate, n_members, max_rounds=4)
    assert sel.score >= max(singles)
    assert sel.chosen[0] == int(np.argmax(singles))
    assert sel.score == evaluate(sel.weights)
    assert np.array_equal(sel.weights, sel.counts / sel.counts.sum()) and sel.counts.sum() == len(sel.chosen)
    assert [r["member"] for r in sel.trajectory[:n_members]] == list(range(n_members))
    assert sum(r["accepted"] for r in sel.trajectory) == len(sel.chosen)


def test_forward_selection_with_replacement_reaches_repeated_member():
    target = np.array([0.5, 0.25, 0.25])
    sel = forward_select(lambda w: -float(((w - target) ** 2).sum()), 3)
    assert np.array_equal(sel.counts, [2, 1, 1]) and sel.score == 0.0
    assert sel.chosen == [0, 1, 2, 0]
    assert len(sel.trajectory) == 3 * 5  # four accepted rounds and the one that found no improvement
    assert forward_select(lambda w: 1.0, 3, max_rounds=5).chosen == [0]  # flat: nothing strictly improves
    assert forward_select(lambda w: float(w[1]), 2, max_rounds=0).chosen == [1]


def test_fit_temperature_picks_the_argmax_and_the_earliest_tie():
    assert fit_temperature(lambda t: -((t - 0.1) ** 2), (0.0, 0.05, 0.1, 0.5))[0] == 0.1
    best, records = fit_temperature(lambda t: 1.0, (0.0, 0.5))
    assert best == 0.0 and [r["temperature"] for r in records] == [0.0, 0.5]


def test_fit_temperature_on_halves_keeps_a_perfect_ensemble():
    members, gold = _halves_case()
    best, _ = fit_temperature(lambda t: held_out_recall(members, gold, method="dual_softmax", temperature=t))
    assert best == 0.0  # already 100: no temperature strictly beats "off"


def test_gold_rows_maps_ids_to_indices():
    rows = gold_rows([7, 9, 8], [30, 10, 20], {7: [10, 20], 9: [99, 30], 8: [99]})
    assert rows == [{1, 2}, {0}, set()]


def test_queries_without_gold_in_the_gallery_are_not_scored():
    members, gold = _halves_case()
    assert held_out_recall([members[0]], gold[:4] + [set()] * 4) == 100.0  # only queries 0-3 count
    with pytest.raises(ValueError, match="no query"):
        held_out_recall(members, [set()] * 8)


def test_scores_rejects_mismatched_members():
    with pytest.raises(ValueError, match="disagree"):
        fused_topk([np.zeros((2, 3)), np.zeros((2, 4))], 1)
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        Scores((np.zeros((2, 3)), np.zeros((4, 2))))


@pytest.mark.parametrize("norm", ["zscore", "softmax", "none"])
@pytest.mark.parametrize("method, temperature", [("none", 0.0), ("dual_softmax", 0.5), ("qb_norm", 0.5)])
def test_in_place_fusion_leaves_its_inputs_alone(norm, method, temperature):
    """Fusion normalises and re-ranks in its own blocks: stored matrices and features given (arrays or tensors,
    already in the working dtype, which could be shared) come back untouched, chunked or not."""
    rng = np.random.default_rng(5)
    mats = [rng.integers(-3, 4, (9, 12)).astype(np.float64) for _ in range(2)]
    feats = _int_members(rng, 9, 12)
    bank = [rng.integers(-3, 4, (5, 12)).astype(np.float64) for _ in range(2)]
    inputs = [mats, [torch.tensor(m) for m in mats], feats, bank]
    before = [
        [
            x.copy() if isinstance(x, np.ndarray) else (x.clone() if torch.is_tensor(x) else tuple(y.copy() for y in x))
            for x in group
        ]
        for group in inputs
    ]
    results = [
        rerank_topk(
            members,
            4,
            [1, 2],
            method=method,
            temperature=temperature,
            norm=norm,
            norm_temperature=0.5,
            bank=bank,
            chunk_size=chunk,
            dtype=torch.float64,
        )
        for members in inputs[:2]
        for chunk in (2, 100)
    ]
    results += [
        rerank_topk(
            feats,
            4,
            [1, 2],
            method=method,
            temperature=temperature,
            norm=norm,
            bank=feats,
            chunk_size=3,
            dtype=torch.float32,
        )
    ]
    for group, saved in zip(inputs, before):
        for x, y in zip(group, saved):
            for a, b in zip(x, y) if isinstance(x, tuple) else [(x, y)]:
                assert np.array_equal(np.asarray(a), np.asarray(b))
    assert all(np.array_equal(r[1], results[0][1]) for r in results[1:4])  # chunking changes nothing
    t = torch.tensor(mats[0])
    zscore(t), softmax(t, 0.5), zscore(mats[0]), dual_softmax(mats[0], 0.5), inverted_softmax(mats[0], bank[0], 0.5)
    assert np.array_equal(t.numpy(), before[0][0]) and np.array_equal(mats[0], before[0][0])


def test_fusion_chunk_keeps_the_working_set_within_the_budget():
    for gallery, budget in ((29_806, 128), (10, 1), (10**9, 128)):
        for norm, blocks in (("zscore", 2), ("none", 2), ("softmax", 3)):
            chunk = fusion_chunk(gallery, budget, norm)
            assert chunk >= 1 and (chunk == 1 or chunk * gallery * 4 * blocks <= budget * 2**20)
    assert fusion_chunk(29_806, 128) == 128 * 2**20 // (2 * 4 * 29_806)

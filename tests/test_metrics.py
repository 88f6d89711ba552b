"""Recall against the official script (exact float equality), top-k against a float64 brute force."""

import json

import numpy as np
import pytest
import torch
from cn_clip.eval.evaluation import compute_score  # the official arithmetic, as referee
from oracles import stable_topk

from solution.retrieval.metrics import present_gold, recall_at_k, topk


def _official(tmp_path, preds, gold):
    g, p = tmp_path / "gold.jsonl", tmp_path / "pred.jsonl"
    g.write_text("".join(json.dumps({"text_id": q, "image_ids": ids}) + "\n" for q, ids in gold.items()))
    p.write_text("".join(json.dumps({"text_id": q, "image_ids": ids}) + "\n" for q, ids in preds.items()))
    mean, r1, r5, r10 = compute_score(str(g), str(p))
    return {"r1": r1, "r5": r5, "r10": r10, "mean_recall": mean}


def _random_case(rng, n, gallery=40):
    gold, preds = {}, {}
    for q in range(n):
        gold[q] = rng.choice(gallery, size=rng.integers(1, 4), replace=False).tolist()
        ranked = rng.permutation(gallery)[:10].tolist()
        if rng.random() < 0.5:  # plant a hit at a random rank
            hit = gold[q][0]
            if hit in ranked:
                ranked.remove(hit)
            ranked.insert(int(rng.integers(0, 10)), hit)
            ranked = ranked[:10]
        preds[q] = ranked
    return preds, gold


@pytest.mark.parametrize("seed", range(6))
def test_recall_equals_official_to_the_last_digit(tmp_path, seed):
    rng = np.random.default_rng(seed)
    preds, gold = _random_case(rng, int(rng.integers(1, 60)))
    assert recall_at_k(preds, gold) == _official(tmp_path, preds, gold)  # exact float equality


def test_recall_thirds_are_exact(tmp_path):
    # 1 hit of 3: hits * 100.0 / n = 33.333333333333336 but the official (1/3)*100 = 33.33333333333333.
    gold = {1: [10], 2: [20], 3: [30]}
    preds = {1: [10] + list(range(100, 109)), 2: list(range(200, 210)), 3: list(range(300, 310))}
    ours = recall_at_k(preds, gold)
    assert ours == _official(tmp_path, preds, gold)
    assert ours["r1"] == (1 / 3) * 100


def test_recall_brute_force_semantics():
    gold = {1: [5, 6], 2: [7], 3: [8]}
    preds = {
        1: [0, 1, 2, 3, 4, 6, 9, 10, 11, 12],  # hit at rank 6: R@10 only
        2: [7, 0, 1, 2, 3, 4, 5, 6, 9, 10],  # rank 1
        3: [0, 1, 2, 3, 8, 4, 5, 6, 9, 10],  # rank 5
        4: [8] * 10,
    }  # not a gold query: ignored
    r = recall_at_k(preds, gold)
    assert (r["r1"], r["r5"], r["r10"]) == ((1 / 3) * 100, (2 / 3) * 100, 100.0)
    assert r["mean_recall"] == ((1 / 3 + 2 / 3 + 1.0) / 3) * 100
    with pytest.raises(ValueError):
        recall_at_k(preds, {})


def _brute_topk(q, g, k):
    return stable_topk(q.astype(np.float64) @ g.astype(np.float64).T, k)  # exact for small integer features


@pytest.mark.parametrize("k,chunk", [(1, 1), (5, 3), (10, 7), (10, 1000), (25, 4), (40, 16)])
def test_topk_matches_brute_force_with_ties(k, chunk):
    rng = np.random.default_rng(k * 100 + chunk)
    q = rng.integers(-1, 2, (37, 6)).astype(np.float32)  # few distinct scores: ties everywhere
    g = rng.integers(-1, 2, (40, 6)).astype(np.float32)
    g[10:14] = g[3]  # exact duplicates straddle many cut-offs
    scores, idx = topk(q, g, k, chunk_size=chunk)
    bs, bi = _brute_topk(q, g, k)
    np.testing.assert_array_equal(idx, bi)
    np.testing.assert_array_equal(scores, bs.astype(np.float32))


def test_topk_all_equal_scores_take_lowest_indices():
    g = np.ones((50, 4), np.float32)
    _, idx = topk(np.ones((3, 4), np.float32), g, 10, chunk_size=2)
    assert idx.tolist() == [list(range(10))] * 3


def _dyadic_floats(rng, shape):
    """Gaussian-looking floats rounded to multiples of 1/64: float32 products of 32 of them are exact,
    so the float64 oracle and any float32 kernel (chunked, matrix-vector, BLAS of any CPU) agree."""
    return (np.round(rng.standard_normal(shape) * 64) / 64).astype(np.float32)


def test_topk_random_floats_and_tensors():
    rng = np.random.default_rng(1)
    q, g = _dyadic_floats(rng, (64, 32)), _dyadic_floats(rng, (500, 32))
    _, ref = _brute_topk(q, g, 10)
    for chunk in (1, 13, 64):
        _, idx = topk(q, g, 10, chunk_size=chunk)
        np.testing.assert_array_equal(idx, ref)
    _, idx_t = topk(torch.from_numpy(q), torch.from_numpy(g), 10)  # tensors are accepted as they are
    np.testing.assert_array_equal(idx_t, ref)


def test_topk_edges():
    g = np.eye(3, dtype=np.float32)
    s, idx = topk(np.zeros((0, 3), np.float32), g, 2)
    assert s.shape == (0, 2) and idx.shape == (0, 2)
    s, idx = topk(g, g, 10)  # k larger than the gallery: the whole gallery, ranked
    assert idx.tolist() == [[0, 1, 2], [1, 0, 2], [2, 0, 1]]


def test_present_gold_is_the_gallery_the_official_evaluator_sees():
    """Gold ids absent from the gallery (undecodable images) are left out; a query left without any is dropped."""
    assert present_gold({0: [99, 10], 1: [98, 97], 2: [13]}, [10, 11, 12, 13]) == {0: [10], 2: [13]}

"""Recall against the official script, per-query hits by definition, top-k against a float64 brute force."""

import json

import numpy as np
import pytest
import torch
from cn_clip.eval.evaluation import compute_score  # the official arithmetic, as referee
from oracles import random_case, stable_topk

from solution.retrieval.metrics import per_query_recall, present_gold, query_hits, recall_at_k
from solution.retrieval.rank import topk


def test_recall_thirds_are_the_officials_to_the_last_digit(tmp_path):
    """1 hit of 3: hits * 100.0 / n = 33.333333333333336 but the official (1/3)*100 = 33.33333333333333."""
    gold = {1: [10], 2: [20], 3: [30]}
    preds = {1: [10] + list(range(100, 109)), 2: list(range(200, 210)), 3: list(range(300, 310))}
    g, p = tmp_path / "gold.jsonl", tmp_path / "pred.jsonl"
    g.write_text("".join(json.dumps({"text_id": q, "image_ids": ids}) + "\n" for q, ids in gold.items()))
    p.write_text("".join(json.dumps({"text_id": q, "image_ids": ids}) + "\n" for q, ids in preds.items()))
    mean, r1, r5, r10 = compute_score(str(g), str(p))
    assert recall_at_k(preds, gold) == {"r1": r1, "r5": r5, "r10": r10, "mean_recall": mean}
    assert r1 == (1 / 3) * 100


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


def test_query_hits_by_definition():
    preds = [[5, 1, 2, 3, 4, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4, 6, 7, 8, 9, 5], list(range(20, 30))]
    gold = [{5}, {5, 99}, {5}]
    assert query_hits(preds, gold).tolist() == [[True, True, True], [False, False, True], [False, False, False]]
    assert per_query_recall(query_hits(preds, gold)).tolist() == [1.0, 1 / 3, 0.0]
    by_id = query_hits({7: preds[1], 3: preds[0]}, {3: gold[0], 7: gold[1]})  # rows in gold's order
    assert by_id.tolist() == [[True, True, True], [False, False, True]]


@pytest.mark.parametrize("seed", range(8))
def test_per_query_recall_averages_to_the_official_mean_recall(seed):
    rng = np.random.default_rng(seed)
    gold, preds = random_case(rng, "t2i", int(rng.integers(1, 80)))
    gold, preds = ({r["text_id"]: r["image_ids"] for r in rows} for rows in (gold, preds))
    hits = query_hits(preds, gold)  # recall_at_k itself is checked against the official script in test_evaluate
    assert abs(100 * per_query_recall(hits).mean() - recall_at_k(preds, gold)["mean_recall"]) < 1e-9


@pytest.mark.parametrize("k,chunk", [(1, 1), (5, 3), (10, 7), (10, 1000), (25, 4), (40, 16)])
def test_topk_matches_brute_force_with_ties(k, chunk):
    rng = np.random.default_rng(k * 100 + chunk)
    q = rng.integers(-1, 2, (37, 6)).astype(np.float32)  # few distinct scores: ties everywhere
    g = rng.integers(-1, 2, (40, 6)).astype(np.float32)
    g[10:14] = g[3]  # exact duplicates straddle many cut-offs
    g[-1] = 0  # a row scoring 0 for every query
    for args in ((q, g), (torch.from_numpy(q), torch.from_numpy(g))):  # tensors are accepted as they are
        scores, idx = topk(*args, k, chunk_size=chunk)
        bs, bi = stable_topk(q.astype(np.float64) @ g.astype(np.float64).T, k)  # exact for small integers
        np.testing.assert_array_equal(idx, bi)
        np.testing.assert_array_equal(scores, bs.astype(np.float32))


def test_topk_edges():
    _, idx = topk(np.ones((3, 4), np.float32), np.ones((50, 4), np.float32), 10, chunk_size=2)
    assert idx.tolist() == [list(range(10))] * 3  # all equal: the lowest indices
    g = np.eye(3, dtype=np.float32)
    s, idx = topk(np.zeros((0, 3), np.float32), g, 2)
    assert s.shape == (0, 2) and idx.shape == (0, 2)
    s, idx = topk(g, g, 10)  # k larger than the gallery: the whole gallery, ranked
    assert idx.tolist() == [[0, 1, 2], [1, 0, 2], [2, 0, 1]]


def test_present_gold_is_the_gallery_the_official_evaluator_sees():
    """Gold ids absent from the gallery (undecodable images) are left out; a query left without any is dropped."""
    assert present_gold({0: [99, 10], 1: [98, 97], 2: [13]}, [10, 11, 12, 13]) == {0: [10], 2: [13]}

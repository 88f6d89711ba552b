"""Retrieval metrics: MUGE's recall in ``evaluation.py``'s arithmetic (to the
digit): a query hits at K when a gold id is among its first K predictions; R@K in percent, the score their mean."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

KS = (1, 5, 10)
RECALL_KEYS = (*(f"r{k}" for k in KS), "mean_recall")


def recall_at_k(predictions: Mapping, gold: Mapping, ks: Sequence[int] = KS) -> dict[str, float]:
    """``{"r1", "r5", "r10", "mean_recall"}`` in percent over the queries of ``gold`` (each must have a prediction)."""
    return recall_from_hits(query_hits(predictions, gold, ks), ks)


def recall_from_hits(hits: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K and mean recall in percent from per-query hits ``[Q, len(ks)]``, in the official script's arithmetic order
    (fraction first, then x100; mean of fractions, then x100), so the digits match it exactly."""
    hits = np.asarray(hits, dtype=bool)
    n = hits.shape[0]
    if n == 0:
        raise ValueError("no queries to score")
    counts = hits.sum(axis=0).tolist()
    out = {f"r{k}": (c * 1.0 / n) * 100 for k, c in zip(ks, counts)}
    out["mean_recall"] = (sum(c * 1.0 / n for c in counts) / len(ks)) * 100
    return out


def present_gold(gold: Mapping[int, Collection[int]], image_ids: Collection[int]) -> dict[int, list[int]]:
    """``gold`` as the official evaluator sees a gallery of ``image_ids``: answers not in it (undecodable
    images) removed, and queries left without any dropped."""
    have = {int(i) for i in image_ids}
    kept = {qid: [a for a in answers if int(a) in have] for qid, answers in gold.items()}
    return {qid: answers for qid, answers in kept.items() if answers}


def query_hits(predictions, gold, ks: Sequence[int] = KS) -> np.ndarray:
    """``[Q, len(ks)]`` booleans: whether a gold id of query ``q`` is among its first ``ks[j]`` predictions.
    Mappings by query id (rows in ``gold``'s order), or sequences aligned by row (an array of predictions)."""
    if isinstance(gold, Mapping):
        rows, answers = [predictions[q] for q in gold], list(gold.values())
    else:
        rows, answers = list(predictions), list(gold)
        if len(rows) != len(answers):
            raise ValueError(f"{len(rows)} prediction rows but {len(answers)} gold entries")
    hits = np.zeros((len(rows), len(ks)), dtype=bool)
    for q, (ranked, gold_q) in enumerate(zip(rows, answers)):
        gold_q, ranked = set(np.asarray(list(gold_q)).tolist()), np.asarray(ranked).tolist()
        hits[q] = [any(i in gold_q for i in ranked[:k]) for k in ks]
    return hits


def per_query_recall(hits: np.ndarray) -> np.ndarray:
    """``v_q = mean_j hits[q, j]`` (float64): query ``q``'s share of the mean recall, ``100 * mean_q v_q``."""
    return np.asarray(hits, dtype=np.float64).mean(axis=1)


def mean_recall(hits: np.ndarray) -> float:
    """Mean recall in percent from per-query hits, the official arithmetic (:func:`recall_from_hits`)."""
    return recall_from_hits(hits)["mean_recall"]

"""Pure retrieval metrics: the one recall function behind the evaluator, validation and the soup.

Semantics are the official MUGE ``evaluation.py``'s: a query scores a hit at K when any of its
gold ids is among its first K predictions; R@K is the hit fraction, in percent, and the
score is the mean of R@1, R@5 and R@10.
"""
from __future__ import annotations

from typing import Collection, Mapping, Sequence

import numpy as np
import torch

KS = (1, 5, 10)


def recall_at_k(predictions: Mapping[int, Sequence[int]], gold: Mapping[int, Collection[int]],
                ks: Sequence[int] = KS) -> dict[str, float]:
    """``{"r1", "r5", "r10", "mean_recall"}`` in percent over the queries of ``gold``.

    Every gold query must have a prediction (the evaluator checks this with a message first).
    """
    if not gold:
        raise ValueError("no gold queries to score")
    hits = {k: 0 for k in ks}
    for qid, answers in gold.items():
        ranked = list(predictions[qid])
        answers = set(answers)
        for k in ks:
            if any(i in answers for i in ranked[:k]):
                hits[k] += 1
    n = len(gold)
    # The official arithmetic, digit for digit: fraction first, then x100 (``hits * 100.0 / n`` differs in
    # the last digit for many counts, e.g. 1/3).
    out = {f"r{k}": (hits[k] * 1.0 / n) * 100 for k in ks}
    # Same arithmetic order as the official script: mean of fractions, then x100.
    out["mean_recall"] = (sum(hits[k] * 1.0 / n for k in ks) / len(ks)) * 100
    return out


def topk(queries, gallery, k: int, *, chunk_size: int = 4096, device: str | torch.device = "cpu"
         ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows for every query by inner product: ``(scores [Q,k], indices [Q,k])``.

    Chunked over queries so memory stays ``chunk_size x len(gallery)``. Ties are broken by the
    lower gallery index, the order a stable sort of the scores gives (as upstream's ``sorted``).
    """
    q = queries.float() if torch.is_tensor(queries) else torch.as_tensor(np.asarray(queries, dtype=np.float32))
    g = (gallery.float() if torch.is_tensor(gallery) else torch.as_tensor(np.asarray(gallery, dtype=np.float32))).to(device)
    n = g.shape[0]
    k = min(k, n)
    all_s, all_i = [], []
    for start in range(0, q.shape[0], chunk_size):
        s = q[start:start + chunk_size].to(device) @ g.T
        kk = min(k + 1, n)
        vals, idx = torch.topk(s, kk, dim=1)
        # Order within the top-k by (score desc, index asc): a stable sort of the candidates by index.
        order = torch.argsort(idx, dim=1)
        vals, idx = torch.gather(vals, 1, order), torch.gather(idx, 1, order)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices
        vals, idx = torch.gather(vals, 1, order), torch.gather(idx, 1, order)
        if kk > k:
            # A tie straddling the k-th place: topk may have picked any of the tied rows. Redo those rows
            # with a full stable sort, which picks the lowest indices like upstream does.
            tied = (vals[:, k - 1] == vals[:, k]).nonzero().flatten()
            for r in tied.tolist():
                full = torch.sort(s[r], descending=True, stable=True)
                vals[r], idx[r] = full.values[:kk], full.indices[:kk]
        all_s.append(vals[:, :k].cpu())
        all_i.append(idx[:, :k].cpu())
    if not all_s:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(all_s).numpy(), torch.cat(all_i).numpy()


def present_gold(gold: Mapping[int, Collection[int]], image_ids: Collection[int]) -> dict[int, list[int]]:
    """``gold`` as the official evaluator would see a gallery of ``image_ids``: answers that are not
    in the gallery (e.g. images that could not be decoded) removed, queries left without any dropped."""
    have = {int(i) for i in image_ids}
    out = {}
    for qid, answers in gold.items():
        kept = [a for a in answers if int(a) in have]
        if kept:
            out[qid] = kept
    return out


def t2i_recall(text_feats, image_feats, text_ids: Sequence[int], image_ids: Sequence[int],
               gold: Mapping[int, Collection[int]], *, device="cpu") -> dict[str, float]:
    """Text->image retrieval recall from L2-normalised features (validation and soup use this).

    Scored over the gallery that exists: gold ids missing from ``image_ids`` are left out and a
    query with no gold image in the gallery is not counted (see :func:`present_gold`), so an
    undecodable image is never a miss. Raises ``ValueError`` when no query is left.
    """
    image_ids = np.asarray(image_ids)
    gold = present_gold(gold, image_ids.tolist())
    if not gold:
        raise ValueError("no query has a gold image among the gallery's images")
    _, idx = topk(text_feats, image_feats, max(KS), device=device)
    preds = {int(t): image_ids[row].tolist() for t, row in zip(text_ids, idx)}
    return recall_at_k(preds, gold)

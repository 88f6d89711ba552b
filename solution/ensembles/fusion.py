"""Score-level ensembles and re-ranking for retrieval: the numeric core, memory-bounded.

Conventions are :mod:`solution.metrics`': a member's scores form a ``[Q, G]`` matrix (rows are the
queries, texts for MUGE's t2i; columns the gallery, images), higher is better; a top-k is best
first with ties going to the lower gallery index; recall is MUGE's mean of R@1/5/10 in percent.

- Normalisation, per query row ``s``: ``zscore(s) = (s - mean s) / std s`` (population std; a
  constant row maps to 0) and ``softmax(s, T) = exp(s / T) / sum_g exp(s_g / T)``.
- Fusion: ``F = sum_m w_m N(S_m) / sum_m w_m`` over members ``m`` (a weighted mean).
- Re-ranking against a bank ``B`` of queries (``L_g = log sum_b exp(F_bg / T)``, a column statistic):
  dual softmax ``F'_qg = F_qg exp(F_qg / T - L_g)`` (Cheng et al. 2021; the bank defaults to the
  queries themselves) and QB-Norm's inverted softmax ``F'_qg = F_qg / T - L_g``, the log of
  ``exp(F_qg/T) / sum_b exp(F_bg/T)`` (Bogolin et al. 2022), optionally dynamic (see
  :func:`rerank_topk`). Temperature 0 means "no re-ranking", exactly: the input comes back unchanged.
- Selection: Caruana et al. (2004) greedy forward selection with replacement (:func:`forward_select`)
  and a grid search for the re-ranking temperature (:func:`fit_temperature`).

Everything that touches the full ``[Q, G]`` matrix goes in chunks of query rows through one
:func:`workspace` of two ``chunk_size x G`` blocks (a member's scores are computed, normalised and
re-ranked in place), so memory stays two blocks (three with softmax) whatever ``Q``, the bank size
and the number of members are; :func:`fusion_chunk` sizes the chunk for a memory budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Sequence
from typing import Union

import numpy as np
import torch

from solution.model.precision import exact_math
from solution.retrieval.metrics import KS, recall_at_k, topk_rows

log = logging.getLogger(__name__)

NORMS = ("none", "zscore", "softmax")
RERANKERS = ("none", "dual_softmax", "qb_norm")
# 0 = off first, so a re-ranker that never helps stays off (ties go to the earliest grid value).
TEMPERATURE_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_CHUNK = 1024
FUSION_MEMORY_MB = 128  # predict --ensemble's fusion working set (see fusion_chunk)


# ---------------------------------------------------------------- per-query normalisation


def _zscore_(s: torch.Tensor) -> torch.Tensor:
    """Per-row z-score of ``s``, in place (no full-size temporary)."""
    # Constant rows by their range, not their std: the computed mean of a constant row need not be exact.
    low, high = torch.aminmax(s, dim=1, keepdim=True)
    centred = s.sub_(s.mean(dim=1, keepdim=True))
    std = torch.linalg.vector_norm(centred, dim=1, keepdim=True) / math.sqrt(s.shape[1])
    varies = (high > low) & (std > 0)
    return centred.div_(torch.where(varies, std, torch.full_like(std, math.inf)))  # constant rows -> 0


def _normalise_(s: torch.Tensor, norm: str, temperature: float) -> torch.Tensor:
    """``N(s)``, overwriting ``s`` (softmax returns a new block: ``s`` holds ``s / T`` after)."""
    if norm == "none":
        return s
    if norm == "zscore":
        return _zscore_(s)
    if norm == "softmax":
        if not temperature > 0:
            raise ValueError(f"softmax normalisation needs a temperature > 0, got {temperature}")
        return torch.softmax(s.div_(temperature), dim=1)
    raise ValueError(f"unknown normalisation {norm!r}; choose from {', '.join(NORMS)}")


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], scores):
    """Run a tensor function on a tensor, or on an array (as float64) returning an array."""
    if torch.is_tensor(scores):
        return fn(scores)
    return fn(torch.as_tensor(np.asarray(scores, dtype=np.float64))).numpy()


def zscore(scores):
    """Per-row z-score ``(s - mean) / std`` (population std) of a ``[Q, G]`` matrix; constant rows -> 0."""
    return _apply(lambda s: _normalise_(s.clone(), "zscore", 1.0), scores)


def softmax(scores, temperature: float = 1.0):
    """Per-row ``exp(s / T) / sum_g exp(s_g / T)`` of a ``[Q, G]`` matrix (``T > 0``)."""
    return _apply(lambda s: _normalise_(s.clone(), "softmax", temperature), scores)


def check_weights(weights, n_members: int) -> np.ndarray:
    """Member weights as float64 summing to 1; ``ValueError`` unless finite, >= 0, with a positive sum."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_members,):
        raise ValueError(f"need one weight per member ({n_members}), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise ValueError(f"weights must be >= 0, got {w.tolist()}")
    if not w.sum() > 0:
        raise ValueError(f"weights must have a positive sum, got {w.tolist()} (sum {w.sum()})")
    return w / w.sum()


# ---------------------------------------------------------------- members and chunked fusion


class Scores:
    """One member's ``[Q, G]`` scores, computed a block of query rows at a time.

    ``Scores((queries [Q, D], gallery [G, D]))`` scores ``queries @ gallery.T`` (each member may
    have its own ``D``); ``Scores(matrix [Q, G])`` reads a stored matrix. The gallery (or the
    matrix block) goes to ``device``; arithmetic is in ``dtype``.
    """

    def __init__(self, source, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        if isinstance(source, tuple):
            q, g = (self._tensor(x) for x in source)
            if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
                raise ValueError(
                    f"member features must be [Q, D] and [G, D], got {tuple(q.shape)} and {tuple(g.shape)}"
                )
            self.queries, self.gallery = q, g.to(self.device)
            self.shape = (q.shape[0], g.shape[0])
        else:
            self.queries, self.gallery = self._tensor(source), None
            if self.queries.ndim != 2:
                raise ValueError(f"a score matrix must be [Q, G], got {tuple(self.queries.shape)}")
            self.shape = tuple(self.queries.shape)

    def _tensor(self, x) -> torch.Tensor:
        return x.to(self.dtype) if torch.is_tensor(x) else torch.as_tensor(np.asarray(x), dtype=self.dtype)

    def rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Scores of queries ``[start, stop)`` written into ``out`` (``[stop - start, G]``)."""
        block = self.queries[start:stop].to(self.device)
        return out.copy_(block) if self.gallery is None else torch.matmul(block, self.gallery.T, out=out)


Member = Union[Scores, tuple, np.ndarray, torch.Tensor]


def as_members(members: Sequence[Member], *, device="cpu", dtype=torch.float32) -> list[Scores]:
    """``Scores`` for each member (given as ``Scores``, a ``(queries, gallery)`` pair or a matrix), same shape."""
    out = [m if isinstance(m, Scores) else Scores(m, device=device, dtype=dtype) for m in members]
    if not out:
        raise ValueError("no members to fuse")
    shapes = {m.shape for m in out}
    if len(shapes) > 1:
        raise ValueError(f"members disagree on [Q, G]: {sorted(shapes)}")
    return out


def workspace(members: Sequence[Scores], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two ``[rows, G]`` blocks fusion works in, reused chunk after chunk: fused rows, one member's scores."""
    m = members[0]
    return tuple(torch.empty((rows, m.shape[1]), dtype=m.dtype, device=m.device) for _ in range(2))


def fusion_chunk(gallery_size: int, memory_mb: float, norm: str = "zscore") -> int:
    """Query rows per chunk so fusion's blocks (:func:`workspace`, + softmax's output) fit in ``memory_mb``."""
    blocks = 3 if norm == "softmax" else 2
    return int(max(1, min(8192, memory_mb * 2**20 // (blocks * 4 * max(1, gallery_size)))))


def fused_rows(
    members: Sequence[Scores],
    weights: np.ndarray,
    start: int,
    stop: int,
    norm: str = "none",
    norm_temperature: float = 1.0,
    work: tuple | None = None,
) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``F = sum_m w_m N(S_m)`` (weights already checked; zero weights skipped): a
    view of ``work[0]``, valid until its next use; each member is scored and normalised in ``work[1]``."""
    n = stop - start
    out, scratch = (b[:n] for b in (work or workspace(members, n)))
    started = False
    for member, w in zip(members, weights):
        if w == 0:
            continue
        s = _normalise_(member.rows(start, stop, out=scratch), norm, norm_temperature)
        out.add_(s, alpha=float(w)) if started else torch.mul(s, float(w), out=out)
        started = True
    return out


def fuse(
    members_scores: Sequence[Member], weights=None, norm: str = "none", *, norm_temperature: float = 1.0
) -> np.ndarray:
    """The whole fused matrix ``sum_m w_m N(S_m) / sum_m w_m`` in float64 (for small sets; see :func:`fused_topk`)."""
    ms = as_members(members_scores, dtype=torch.float64)
    w = check_weights(np.ones(len(ms)) if weights is None else weights, len(ms))
    return fused_rows(ms, w, 0, ms[0].shape[0], norm, norm_temperature).cpu().numpy()


def fused_topk(
    members: Sequence[Member],
    k: int,
    weights=None,
    *,
    norm: str = "none",
    norm_temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    device="cpu",
    dtype=torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [Q, k], gallery indices [Q, k])`` of the fused scores, best first, ties to the lower index."""
    return rerank_topk(
        members,
        k,
        weights,
        norm=norm,
        norm_temperature=norm_temperature,
        chunk_size=chunk_size,
        device=device,
        dtype=dtype,
    )


# ---------------------------------------------------------------- re-ranking


def _bank_stats(
    bank: Sequence[Scores],
    w: np.ndarray,
    temperature: float,
    bank_topk: int | None,
    chunk_size: int,
    norm: str,
    norm_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``L_g = log sum_b exp(F_bg / T)`` over the bank, and (``bank_topk``) which columns are in some bank row's
    top-k (the active set)."""
    n_bank, n_gallery = bank[0].shape
    lse = torch.full((n_gallery,), -math.inf, dtype=bank[0].dtype, device=bank[0].device)
    active = torch.zeros(n_gallery, dtype=torch.bool, device=bank[0].device) if bank_topk else None
    work = workspace(bank, min(chunk_size, n_bank))
    for start in range(0, n_bank, chunk_size):
        f = fused_rows(bank, w, start, min(start + chunk_size, n_bank), norm, norm_temperature, work)
        if active is not None:
            active[topk_rows(f, bank_topk)[1].flatten()] = True
        f.div_(temperature)  # column log-sum-exp of F / T, its exponentials in the scratch block
        top = f.amax(dim=0)
        e = torch.sub(f, top, out=work[1][: len(f)]).exp_()
        lse = torch.logaddexp(lse, e.sum(dim=0).log_().add_(top))
    return lse, active


def _rerank_block(
    f: torch.Tensor, method: str, temperature: float, lse: torch.Tensor, active: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """The re-ranked block, written into ``out`` (same shape as ``f``; ``f`` is left as it is)."""
    out = torch.div(f, temperature, out=out).sub_(lse)
    if method == "dual_softmax":
        return out.exp_().mul_(f)
    if active is None:
        return out
    gate = active[topk_rows(f, 1)[1][:, 0]]  # the row's top-1 (ties to the lower index) is in the active set
    return torch.where(gate[:, None], out, f, out=out)


def _check_rerank(method: str, temperature: float, bank, bank_topk: int | None) -> None:
    if method not in RERANKERS:
        raise ValueError(f"unknown re-ranker {method!r}; choose from {', '.join(RERANKERS)}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"re-ranking temperature must be finite and >= 0 (0 = off), got {temperature}")
    if method == "qb_norm" and temperature > 0 and bank is None:
        raise ValueError("qb_norm needs a query bank (e.g. training texts scored against the same gallery)")
    if bank_topk is not None and bank_topk < 1:
        raise ValueError(f"bank_topk must be >= 1 or None, got {bank_topk}")


@exact_math()  # ranking in full float32 whatever the caller set (TF32 off)
def rerank_topk(
    members: Sequence[Member],
    k: int,
    weights=None,
    *,
    method: str = "none",
    temperature: float = 0.0,
    bank: Sequence[Member] | None = None,
    bank_topk: int | None = None,
    norm: str = "none",
    norm_temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    device="cpu",
    dtype=torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(scores, gallery indices)`` of the fused scores after re-ranking, in chunks of query rows.

    ``method``: ``none``; ``dual_softmax`` (``F * exp(F/T - L)``, bank = the queries themselves unless
    given); ``qb_norm`` (``F/T - L``, the log inverted softmax). ``bank`` holds one entry per member,
    scoring the bank queries against the same gallery (e.g. ``(train_text_feats_m, gallery_feats_m)``).
    ``bank_topk`` (qb_norm): QB-Norm's dynamic inverted softmax as in its reference code: a gallery item
    is *active* when it is in the top-``bank_topk`` of some bank query; a query row is normalised only
    when its own top-1 item is active, other rows keep their fused scores (rows are ranked on their own,
    so mixing scales across rows is harmless). ``temperature == 0``: no re-ranking, exactly.
    """
    _check_rerank(method, temperature, bank, bank_topk)
    ms = as_members(members, device=device, dtype=dtype)
    w = check_weights(np.ones(len(ms)) if weights is None else weights, len(ms))
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1, got k={k}, chunk_size={chunk_size}")
    stats = None
    if method != "none" and temperature > 0:
        bank_ms = ms if bank is None else as_members(bank, device=device, dtype=dtype)
        if len(bank_ms) != len(ms) or bank_ms[0].shape[1] != ms[0].shape[1]:
            raise ValueError(f"the bank needs one entry per member ({len(ms)}) over the same gallery")
        stats = _bank_stats(
            bank_ms, w, temperature, bank_topk if method == "qb_norm" else None, chunk_size, norm, norm_temperature
        )
    n_queries = ms[0].shape[0]
    all_s, all_i = [], []
    work = workspace(ms, min(chunk_size, n_queries))
    for start in range(0, n_queries, chunk_size):
        f = fused_rows(ms, w, start, min(start + chunk_size, n_queries), norm, norm_temperature, work)
        if stats is not None:
            f = _rerank_block(f, method, temperature, *stats, out=work[1][: len(f)])
        s, i = topk_rows(f, k)
        all_s.append(s.cpu())
        all_i.append(i.cpu())
    if not all_s:
        k = min(k, ms[0].shape[1])
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(all_s).numpy(), torch.cat(all_i).numpy()


def dual_softmax(scores, temperature: float, bank_scores=None) -> np.ndarray:
    """Dual softmax ``S * exp(S/T - L)``, ``L_g = log sum_b exp(B_bg / T)`` over ``bank_scores`` (default ``S``);
    ``T = 0``: ``S`` unchanged. Float64, whole matrices; :func:`rerank_topk` is the chunked version."""
    return _rerank_matrix(scores, "dual_softmax", temperature, bank_scores, None)


def inverted_softmax(scores, bank_scores, temperature: float, bank_topk: int | None = None) -> np.ndarray:
    """QB-Norm's log inverted softmax ``S/T - L``, dynamic with ``bank_topk`` (see :func:`rerank_topk`);
    ``T = 0``: ``S`` unchanged. Float64, whole matrices; :func:`rerank_topk` is the chunked version."""
    return _rerank_matrix(scores, "qb_norm", temperature, bank_scores, bank_topk)


def _rerank_matrix(scores, method: str, temperature: float, bank_scores, bank_topk) -> np.ndarray:
    _check_rerank(method, temperature, bank_scores, bank_topk)
    s = Scores(scores, dtype=torch.float64)
    if temperature == 0:
        return s.queries.numpy().copy()
    bank = s if bank_scores is None else Scores(bank_scores, dtype=torch.float64)
    lse, active = _bank_stats(
        [bank], np.ones(1), temperature, bank_topk if method == "qb_norm" else None, max(1, bank.shape[0]), "none", 1.0
    )
    return _rerank_block(s.queries, method, temperature, lse, active, torch.empty_like(s.queries)).numpy()


# ---------------------------------------------------------------- scoring and selection


def held_out_recall(members: Sequence[Member], gold: Sequence[Collection[int]], weights=None, **kwargs) -> float:
    """MUGE mean recall (percent) of the (re-ranked) fused top-10; ``gold[q]``: gallery *indices* of query ``q``.

    Queries with an empty gold set are not scored (as :func:`solution.metrics.present_gold` leaves
    out queries without a gold image in the gallery). ``kwargs`` go to :func:`rerank_topk`.
    """
    _, idx = rerank_topk(members, max(KS), weights, **kwargs)
    if len(idx) != len(gold):
        raise ValueError(f"{len(idx)} queries scored but {len(gold)} gold entries")
    answers = {q: set(g) for q, g in enumerate(gold) if len(g)}
    if not answers:
        raise ValueError("no query has a gold item in the gallery")
    return recall_at_k({q: idx[q].tolist() for q in answers}, answers)["mean_recall"]


def gold_rows(query_ids: Sequence[int], gallery_ids: Sequence[int], gold) -> list[set[int]]:
    """Gold gallery *indices* per query row from a ``{query id: [gallery ids]}`` mapping.

    Gold ids missing from the gallery are dropped (with a warning): such pairs can never be hit, and
    a query left with none is not scored by :func:`held_out_recall`.
    """
    where = {int(g): i for i, g in enumerate(np.asarray(gallery_ids).tolist())}
    out = [{where[int(g)] for g in gold[int(q)] if int(g) in where} for q in np.asarray(query_ids).tolist()]
    missing = sum(len(gold[int(q)]) for q in np.asarray(query_ids).tolist()) - sum(map(len, out))
    if missing:
        log.warning("%d gold ids are not in the gallery: those pairs can never be hit", missing)
    return out


@dataclasses.dataclass
class Selection:
    """Forward selection's outcome: ``chosen`` members in order of addition (repeats allowed)."""

    chosen: list[int]
    counts: np.ndarray
    weights: np.ndarray  # counts / counts.sum()
    score: float
    trajectory: list[dict]  # one record per candidate tried: round, member, counts, score, accepted


def forward_select(evaluate: Callable[[np.ndarray], float], n_members: int, *, max_rounds: int = 20) -> Selection:
    """Caruana et al. (2004) greedy forward selection with replacement, maximising ``evaluate(weights)``.

    Round 0 scores each member alone and starts from the best (ties: lower index). Each later round
    tries adding every member (already chosen ones too) and keeps the best addition only if it
    strictly improves the score; it stops otherwise or after ``max_rounds`` additions. Weights are
    ``counts / total``, so the result never scores below its best single member. Evaluations of
    proportional counts are cached (same weights).
    """
    if n_members < 1:
        raise ValueError("forward selection needs at least one member")
    cache: dict[tuple, float] = {}
    trajectory: list[dict] = []

    def score(counts: np.ndarray, rnd: int, member: int) -> float:
        g = math.gcd(*counts.tolist())
        key = tuple((counts // g).tolist())
        if key not in cache:
            cache[key] = float(evaluate(counts / counts.sum()))
        trajectory.append(
            {"round": rnd, "member": member, "counts": counts.tolist(), "score": cache[key], "accepted": False}
        )
        return cache[key]

    counts = np.zeros(n_members, dtype=np.int64)
    best, best_score, best_rec = None, -math.inf, None
    for rnd in range(max_rounds + 1):
        base = counts.copy()
        for m in range(n_members):
            trial = base.copy()
            trial[m] += 1
            s = score(trial, rnd, m)
            if s > best_score:  # strict: ties keep the earlier (lower) member; a round must beat the current score
                best, best_score, best_rec = m, s, trajectory[-1]
        if best_rec is None or best_rec["round"] != rnd:
            break
        best_rec["accepted"] = True
        counts[best] += 1
        log.info("forward selection round %d: + member %d -> %.4f (counts %s)", rnd, best, best_score, counts.tolist())
    chosen = [r["member"] for r in trajectory if r["accepted"]]
    return Selection(chosen, counts, counts / counts.sum(), best_score, trajectory)


def fit_temperature(
    evaluate: Callable[[float], float], grid: Sequence[float] = TEMPERATURE_GRID
) -> tuple[float, list[dict]]:
    """``argmax_T evaluate(T)`` over ``grid`` (ties: the earliest value, so list 0 = off first) and the records."""
    if not len(grid):
        raise ValueError("empty temperature grid")
    records = [{"temperature": float(t), "score": float(evaluate(float(t)))} for t in grid]
    best = max(records, key=lambda r: r["score"])  # max keeps the first of equal scores
    log.info(
        "temperature %g: %.4f (%s)",
        best["temperature"],
        best["score"],
        ", ".join(f"{r['temperature']:g}: {r['score']:.4f}" for r in records),
    )
    return best["temperature"], records

"""Score-level fusion and re-ranking in chunks of query rows, and the searches that choose them.

A member scores ``queries @ gallery.T`` (``[Q, G]``, higher is better; members may differ in width). The
fusion is ``F = sum_m w_m N(S_m)`` (weights summing to 1), ``N`` per query row: none, z-score (population
std; a constant row maps to 0) or ``softmax(s / T)``. Re-rankers use a bank of queries ``B`` scored against
the same gallery, ``L_g = log sum_b exp(F_bg / T)``: dual softmax ``F * exp(F / T - L)`` (the bank defaults
to the queries themselves) and QB-Norm's inverted softmax ``F / T - L`` (dynamic with ``bank_topk``); ``T = 0``
is no re-ranking, exactly. Top-k ties go to the lower gallery index. Everything runs in two ``chunk x G``
blocks (three with softmax), whatever ``Q``, the bank and the members: :func:`fusion_chunk` sizes the chunk.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from solution.model.precision import exact_math
from solution.retrieval.metrics import topk_rows

log = logging.getLogger(__name__)

NORMS = ("none", "zscore", "softmax")
RERANKERS = ("none", "dual_softmax", "qb_norm")
TEMPERATURE_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # 0 = off first: ties keep it off
DEFAULT_CHUNK = 1024
FUSION_MEMORY_MB = 128  # predict --ensemble's fusion working set (see fusion_chunk)

Members = list[tuple[torch.Tensor, torch.Tensor]]


def _normalise_(s: torch.Tensor, norm: str, temperature: float) -> torch.Tensor:
    """``N(s)`` per row, overwriting ``s`` (softmax returns a new block)."""
    if norm == "zscore":  # constant rows told by their range: the computed mean of one need not be exact
        low, high = torch.aminmax(s, dim=1, keepdim=True)
        centred = s.sub_(s.mean(dim=1, keepdim=True))
        std = torch.linalg.vector_norm(centred, dim=1, keepdim=True) / math.sqrt(s.shape[1])
        return centred.div_(torch.where((high > low) & (std > 0), std, torch.full_like(std, math.inf)))
    if norm == "softmax":
        if not temperature > 0:
            raise ValueError(f"softmax normalisation needs a temperature > 0, got {temperature}")
        return torch.softmax(s.div_(temperature), dim=1)
    if norm != "none":
        raise ValueError(f"unknown normalisation {norm!r}; choose from {', '.join(NORMS)}")
    return s


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


def _members(pairs: Sequence[tuple], device, dtype) -> Members:
    """Each member's ``(queries [Q, D], gallery [G, D])`` as tensors in ``dtype``, the gallery on ``device``."""
    out = []
    for q, g in pairs:
        q, g = (torch.as_tensor(x, dtype=dtype) for x in (q, g))
        if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
            raise ValueError(f"member features must be [Q, D] and [G, D], got {tuple(q.shape)} and {tuple(g.shape)}")
        out.append((q, g.to(device)))
    shapes = {(len(q), len(g)) for q, g in out}
    if len(shapes) != 1:
        raise ValueError(f"members must share [Q, G], got {sorted(shapes)}")
    return out


def fusion_chunk(gallery_size: int, memory_mb: float, norm: str = "zscore") -> int:
    """Query rows per chunk so fusion's blocks (two, three with softmax) fit in ``memory_mb``."""
    blocks = 3 if norm == "softmax" else 2
    return int(max(1, min(8192, memory_mb * 2**20 // (blocks * 4 * max(1, gallery_size)))))


def _fused_rows(members: Members, w: np.ndarray, rows: slice, norm: str, norm_temperature: float, work) -> torch.Tensor:
    """Rows of ``F`` in ``work[0]`` (valid until its next use); each member scored and normalised in ``work[1]``."""
    n = rows.stop - rows.start
    out, scratch = work[0][:n], work[1][:n]
    out.zero_()
    for (q, g), wm in zip(members, w):
        if wm > 0:
            s = torch.matmul(q[rows].to(g.device), g.T, out=scratch)
            out.add_(_normalise_(s, norm, norm_temperature), alpha=float(wm))
    return out


def _bank_stats(bank: Members, w, temperature: float, bank_topk: int | None, chunk: int, norm: str, norm_t: float):
    """``L_g`` over the bank, and (``bank_topk``) the active set: columns in some bank row's top-k."""
    g0, n_bank = bank[0][1], len(bank[0][0])
    lse = torch.full((len(g0),), -math.inf, dtype=g0.dtype, device=g0.device)
    active = torch.zeros(len(g0), dtype=torch.bool, device=g0.device) if bank_topk else None
    work = [torch.empty((min(chunk, n_bank), len(g0)), dtype=g0.dtype, device=g0.device) for _ in range(2)]
    for start in range(0, n_bank, chunk):
        f = _fused_rows(bank, w, slice(start, min(start + chunk, n_bank)), norm, norm_t, work)
        if active is not None:
            active[topk_rows(f, bank_topk)[1].flatten()] = True
        f.div_(temperature)
        top = f.amax(dim=0)
        e = torch.sub(f, top, out=work[1][: len(f)]).exp_()
        lse = torch.logaddexp(lse, e.sum(dim=0).log_().add_(top))
    return lse, active


def _rerank_block(f: torch.Tensor, method: str, temperature: float, lse, active, out: torch.Tensor) -> torch.Tensor:
    """The re-ranked block, written into ``out`` (``f`` is left as it is)."""
    out = torch.div(f, temperature, out=out).sub_(lse)
    if method == "dual_softmax":
        return out.exp_().mul_(f)
    if active is None:
        return out
    gate = active[topk_rows(f, 1)[1][:, 0]]  # a row is normalised when its own top-1 is active
    return torch.where(gate[:, None], out, f, out=out)


@exact_math()  # ranking in full float32 whatever the caller set
def rerank_topk(
    members: Sequence[tuple],
    k: int,
    weights=None,
    *,
    method: str = "none",
    temperature: float = 0.0,
    bank: Sequence[tuple] | None = None,
    bank_topk: int | None = None,
    norm: str = "none",
    norm_temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    device="cpu",
    dtype=torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [Q, k], gallery indices [Q, k])`` of the fused, re-ranked scores of ``members`` (``(queries,
    gallery)`` pairs), best first. ``bank``: a ``(bank queries, gallery)`` pair per member (``qb_norm``)."""
    if method not in RERANKERS:
        raise ValueError(f"unknown re-ranker {method!r}; choose from {', '.join(RERANKERS)}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"re-ranking temperature must be finite and >= 0 (0 = off), got {temperature}")
    if method == "qb_norm" and temperature > 0 and bank is None:
        raise ValueError("qb_norm needs a query bank (e.g. training texts scored against the same gallery)")
    if k < 1 or chunk_size < 1 or (bank_topk is not None and bank_topk < 1):
        raise ValueError(f"k, chunk_size and bank_topk must be >= 1, got {k}, {chunk_size}, {bank_topk}")
    ms = _members(members, device, dtype)
    w = check_weights(np.ones(len(ms)) if weights is None else weights, len(ms))
    n_queries, n_gallery = len(ms[0][0]), len(ms[0][1])
    stats = None
    if method != "none" and temperature > 0:
        bank_ms = ms if bank is None else _members(bank, device, dtype)
        if len(bank_ms) != len(ms) or len(bank_ms[0][1]) != n_gallery:
            raise ValueError(f"the bank needs one entry per member ({len(ms)}) over the same gallery")
        topk_bank = bank_topk if method == "qb_norm" else None
        stats = _bank_stats(bank_ms, w, temperature, topk_bank, chunk_size, norm, norm_temperature)
    work = [torch.empty((min(chunk_size, n_queries), n_gallery), dtype=dtype, device=device) for _ in range(2)]
    all_s, all_i = [torch.zeros((0, min(k, n_gallery)))], [torch.zeros((0, min(k, n_gallery)), dtype=torch.int64)]
    for start in range(0, n_queries, chunk_size):
        f = _fused_rows(ms, w, slice(start, min(start + chunk_size, n_queries)), norm, norm_temperature, work)
        if stats is not None:
            f = _rerank_block(f, method, temperature, *stats, out=work[1][: len(f)])
        s, i = topk_rows(f, k)
        all_s.append(s.cpu())
        all_i.append(i.cpu())
    return torch.cat(all_s).numpy(), torch.cat(all_i).numpy()


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

    Round 0 starts from the best single member (ties: the lower index); each later round adds the member
    that scores best if that strictly improves the score, for at most ``max_rounds`` additions. Weights are
    ``counts / total`` (never below the best member alone); proportional counts are evaluated once.
    """
    if n_members < 1:
        raise ValueError("forward selection needs at least one member")
    cache: dict[tuple, float] = {}
    trajectory: list[dict] = []
    counts = np.zeros(n_members, dtype=np.int64)
    best_score, best_rec = -math.inf, None
    for rnd in range(max_rounds + 1):
        for m in range(n_members):
            trial = counts.copy()
            trial[m] += 1
            key = tuple((trial // math.gcd(*trial.tolist())).tolist())
            if key not in cache:
                cache[key] = float(evaluate(trial / trial.sum()))
            trajectory.append(
                {"round": rnd, "member": m, "counts": trial.tolist(), "score": cache[key], "accepted": False}
            )
            if cache[key] > best_score:  # strict: ties keep the lower member, and a round must improve
                best_score, best_rec = cache[key], trajectory[-1]
        if best_rec is None or best_rec["round"] != rnd:
            break
        best_rec["accepted"] = True
        counts[best_rec["member"]] += 1
        log.info(
            f"forward selection round {rnd}: + member {best_rec['member']} -> {best_score:.4f} ({counts.tolist()})"
        )
    chosen = [r["member"] for r in trajectory if r["accepted"]]
    return Selection(chosen, counts, counts / counts.sum(), best_score, trajectory)


def fit_temperature(
    evaluate: Callable[[float], float], grid: Sequence[float] = TEMPERATURE_GRID
) -> tuple[float, list[dict]]:
    """``argmax_T evaluate(T)`` over ``grid`` (ties: the earliest value) and a record per value."""
    if not len(grid):
        raise ValueError("empty temperature grid")
    records = [{"temperature": float(t), "score": float(evaluate(float(t)))} for t in grid]
    best = max(records, key=lambda r: r["score"])  # max keeps the first of equal scores
    log.info(f"temperature {best['temperature']:g}: {best['score']:.4f}")
    return best["temperature"], records

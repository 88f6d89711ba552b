"""Score-level fusion and re-ranking in chunks of query rows.

``F = sum_m w_m N(q_m @ g_m.T)`` (weights summing to 1), ``N`` per query row: none, z-score (population std; a
constant row maps to 0) or ``softmax(s / T)``. With ``L_g = log sum_b exp(F_bg / T)`` over a bank of queries:
dual softmax ``F * exp(F / T - L)`` and QB-Norm's ``F / T - L`` (``bank_topk``: only rows whose top-1 is in
some bank row's top-k); ``T = 0`` is no re-ranking. Top-k ties go to the lower gallery index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from solution.model.precision import exact_math
from solution.retrieval.metrics import topk_rows

NORMS = ("none", "zscore", "softmax")
RERANKERS = ("none", "dual_softmax", "qb_norm")
TEMPERATURE_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # 0 = off first: ties keep it off
DEFAULT_CHUNK = 1024
FUSION_MEMORY_MB = 128  # predict --ensemble's fusion working set (see fusion_chunk)


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
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise ValueError(f"weights must be finite, >= 0 and have a positive sum, got {w.tolist()}")
    return w / w.sum()


def _members(pairs: Sequence[tuple], device, dtype) -> list:
    """Each member's ``(queries [Q, D], gallery [G, D])`` as tensors in ``dtype``, the gallery on ``device``."""
    return [(torch.as_tensor(q, dtype=dtype), torch.as_tensor(g, dtype=dtype).to(device)) for q, g in pairs]


def fusion_chunk(gallery_size: int, memory_mb: float, norm: str = "zscore") -> int:
    """Query rows per chunk so fusion's blocks (two, three with softmax) fit in ``memory_mb``."""
    blocks = 3 if norm == "softmax" else 2
    return int(max(1, min(8192, memory_mb * 2**20 // (blocks * 4 * max(1, gallery_size)))))


def _fused_rows(members: list, w: np.ndarray, rows: slice, norm: str, norm_temperature: float, work) -> torch.Tensor:
    """Rows of ``F`` in ``work[0]`` (valid until its next use); each member scored and normalised in ``work[1]``."""
    n = rows.stop - rows.start
    out, scratch = work[0][:n], work[1][:n]
    out.zero_()
    for (q, g), wm in zip(members, w):
        if wm > 0:
            s = torch.matmul(q[rows].to(g.device), g.T, out=scratch)
            out.add_(_normalise_(s, norm, norm_temperature), alpha=float(wm))
    return out


def _bank_stats(bank: list, w, temperature: float, bank_topk: int | None, chunk: int, norm: str, norm_t: float):
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

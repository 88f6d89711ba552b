"""Score-level fusion and re-ranking in chunks of query rows, and choosing an ensemble on held-out queries.

``F = sum_m w_m N(q_m @ g_m.T)``, ``N`` per query row: none, z-score or ``softmax(s / T)``. With ``L_g = log sum_b
exp(F_bg / T)`` over a bank of queries: dual softmax ``F * exp(F / T - L)``, QB-Norm ``F / T - L``; ``T = 0``: off.
:func:`select` takes the best softmax temperature and weights, then keeps flip TTA and each re-ranker only when
it strictly helps (fixed ``--weights`` are kept as given)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from solution.common import SolutionError
from solution.model.precision import exact_math
from solution.retrieval.metrics import KS, query_hits, recall_from_hits
from solution.retrieval.rank import topk_rows
from solution.stats import crossfit

log = logging.getLogger(__name__)

NORMS = ("none", "zscore", "softmax")
RERANKERS = ("none", "dual_softmax", "qb_norm")
TEMPERATURE_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # 0 = off first: ties keep it off
NORM_GRID = tuple(t for t in TEMPERATURE_GRID if t > 0)
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


def forward_select(evaluate: Callable[[np.ndarray], float], n_members: int, *, max_rounds: int = 20):
    """Caruana et al. (2004) greedy forward selection with replacement maximising ``evaluate(weights)``: ``(counts,
    score, a record per candidate)``; each round adds the best member (ties: the lower index) if it strictly helps."""
    cache: dict[tuple, float] = {}
    trajectory: list[dict] = []
    counts, best_score, best = np.zeros(n_members, dtype=np.int64), -math.inf, None
    for rnd in range(max_rounds + 1):
        for m in range(n_members):
            trial = counts.copy()
            trial[m] += 1
            key = tuple((trial // math.gcd(*trial.tolist())).tolist())
            if key not in cache:
                cache[key] = float(evaluate(trial / trial.sum()))
            trajectory.append({"round": rnd, "member": m, "counts": trial.tolist(), "score": cache[key]})
            trajectory[-1]["accepted"] = False
            if cache[key] > best_score:  # strict: ties keep the lower member, and a round must improve
                best_score, best = cache[key], trajectory[-1]
        if best is None or best["round"] != rnd:
            break
        best["accepted"] = True
        counts[best["member"]] += 1
        log.info(f"forward selection round {rnd}: + member {best['member']} -> {best_score:.4f} ({counts.tolist()})")
    return counts, best_score, trajectory


def fit_temperature(evaluate: Callable[[float], float], grid: Sequence[float] = TEMPERATURE_GRID):
    """``argmax_T evaluate(T)`` over ``grid`` (ties: the earliest value) and a record per value."""
    records = [{"temperature": float(t), "score": float(evaluate(float(t)))} for t in grid]
    best = max(records, key=lambda r: r["score"])  # max keeps the first of equal scores
    return best["temperature"], records


@dataclasses.dataclass(frozen=True)
class Choice:
    """A fused ranking: member weights, the normalisation, flip TTA or not, the re-ranker and its temperature."""

    weights: tuple
    norm: str = "zscore"
    norm_temperature: float = 1.0
    rerank: str = "none"
    temperature: float = 0.0
    tta: str = "none"

    def record(self) -> dict:
        return {
            "weights": [float(w) for w in self.weights],
            "norm": self.norm,
            "norm_temperature": self.norm_temperature if self.norm == "softmax" else None,
            "tta": self.tta,
            "rerank": {"method": self.rerank if self.temperature > 0 else "none", "temperature": self.temperature},
        }


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to choose: fixed ``weights`` or forward selection, the normalisation, what else to try."""

    norm: str = "zscore"
    weights: tuple | None = None
    rerankers: tuple = ()
    max_rounds: int = 20
    tta: tuple = ()  # test-time augmentations to try ("flip")


@dataclasses.dataclass
class Problem:
    """Members' query, gallery (and bank, flipped gallery) features, and the gold gallery indices of each query."""

    queries: Sequence[np.ndarray]
    galleries: Sequence[np.ndarray]
    gold: Sequence[set]
    banks: Sequence[np.ndarray] | None = None
    device: str = "cpu"
    bank_topk: int | None = None
    flipped: Sequence[np.ndarray] | None = None

    @classmethod
    def of(cls, members: Sequence, query_ids, gold: dict, **kw) -> Problem:
        """Encoded members (:class:`~.make_ensemble.Member`) and the gold gallery rows of queries ``{id: [gallery ids]}``."""
        where = {int(g): i for i, g in enumerate(members[0].gallery_ids.tolist())}
        rows = [{where[int(g)] for g in gold[int(q)] if int(g) in where} for q in query_ids]
        banks = [m.bank for m in members] if members[0].bank is not None else None
        flipped = [m.flipped for m in members] if members[0].flipped is not None else None
        return cls([m.queries for m in members], [m.gallery for m in members], rows, banks, flipped=flipped, **kw)

    def alone(self, i: int) -> Choice:
        """Member ``i`` alone, as its own features rank."""
        return Choice(tuple(np.eye(len(self.queries))[i].tolist()), "none")

    def ranked(self, choice: Choice, rows, k: int = max(KS), chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
        """Top-``k`` gallery indices of ``rows`` under ``choice`` (dual softmax's bank: these rows themselves)."""
        if choice.tta == "flip" and self.flipped is None:
            raise SolutionError("flip TTA asked but no flipped gallery features were encoded")
        galleries = self.flipped if choice.tta == "flip" else self.galleries
        qb = choice.rerank == "qb_norm" and choice.temperature > 0
        return rerank_topk(
            [(q[rows], g) for q, g in zip(self.queries, galleries)],
            min(k, len(galleries[0])),
            np.asarray(choice.weights),
            method=choice.rerank,
            temperature=choice.temperature,
            bank=list(zip(self.banks, galleries)) if qb else None,
            bank_topk=self.bank_topk,
            norm=choice.norm,
            norm_temperature=choice.norm_temperature,
            chunk_size=chunk_size,
            device=self.device,
        )[1]

    def hits(self, choice: Choice, rows) -> tuple[np.ndarray, np.ndarray]:
        """``(rows scored, their hits [n, 3])``: the rows with a gold image in the gallery, ranked among ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        scored = np.asarray([i for i, r in enumerate(rows.tolist()) if self.gold[r]], dtype=np.int64)
        if not len(scored):
            raise SolutionError(f"an empty query set: none of the {len(rows)} queries has a gold image in the gallery")
        idx = self.ranked(choice, rows)[scored]
        return rows[scored], query_hits(idx, [self.gold[r] for r in rows[scored].tolist()])

    def recall(self, choice: Choice, rows) -> dict:
        """MUGE R@1/5/10 and mean recall (percent) of ``rows`` (queries without a gold image not scored)."""
        scored, hits = self.hits(choice, rows)
        return {**recall_from_hits(hits), "queries_scored": len(scored)}

    def score(self, choice: Choice, rows) -> float:
        return float(self.recall(choice, rows)["mean_recall"])


def select(problem: Problem, rows, plan: Plan, records: list, tag: dict | None = None) -> tuple[Choice, float]:
    """The choice made on ``rows`` and its score there; a record per candidate goes to ``records``."""
    n = len(problem.queries)

    def score(**changes) -> float:
        return problem.score(dataclasses.replace(choice, **changes), rows)

    def note(stage: str, accepted: bool, **record) -> None:
        records.append({**(tag or {}), "stage": stage, **record, "accepted": accepted})

    choice = Choice(tuple(np.full(n, 1.0 / n).tolist()), plan.norm)
    if plan.norm == "softmax":
        t, recs = fit_temperature(lambda t: score(norm_temperature=t), NORM_GRID)
        for r in recs:
            note("norm_temperature", r["temperature"] == t, **r)
        choice = dataclasses.replace(choice, norm_temperature=t)
    if plan.weights is not None:
        choice = dataclasses.replace(choice, weights=tuple(check_weights(plan.weights, n).tolist()))
        best = score()
        note("weights", True, weights=list(choice.weights), score=best)
    else:
        counts, best, trajectory = forward_select(
            lambda w: score(weights=tuple(w.tolist())), n, max_rounds=plan.max_rounds
        )
        for r in trajectory:
            note("weights", r.pop("accepted"), **r, weights=(np.asarray(r["counts"]) / sum(r["counts"])).tolist())
        choice = dataclasses.replace(choice, weights=tuple((counts / counts.sum()).tolist()))
    for tta in plan.tta:
        s = score(tta=tta)
        note("tta", s > best, method=tta, score=s)
        if s > best:
            choice, best = dataclasses.replace(choice, tta=tta), s
    chosen = choice
    for method in plan.rerankers:
        t, recs = fit_temperature(lambda t: score(rerank=method, temperature=t))
        top = max(r["score"] for r in recs)
        for r in recs:
            note("rerank", top > best and r["temperature"] == t, method=method, **r)
        if top > best:
            chosen, best = dataclasses.replace(choice, rerank=method, temperature=t), top
    log.info(f"{tag or ''} choice {chosen.record()}: {best:.4f} on {len(rows)} queries")
    return chosen, best


def choose(problem: Problem, rows, plan: Plan, folds: int | None, seed: int, records: list, ids=None):
    """``(choice on all rows, its score there, cross-fit record or None, held-out hits or None)``. With ``folds``,
    the rows with a gold image are cross-fitted in :func:`solution.stats.id_folds` of their ``ids``."""
    if not folds:
        return (*select(problem, rows, plan, records), None, None)
    rows = np.asarray([r for r in np.asarray(rows).tolist() if problem.gold[r]], dtype=np.int64)
    if not 2 <= folds <= len(rows):
        raise SolutionError(f"--folds {folds}: need 2 <= K <= {len(rows)} (the selection queries)")
    scores: list = []

    def select_fn(part: np.ndarray) -> Choice:
        choice, score = select(problem, part, plan, records, {"fold": len(scores) if len(scores) < folds else "refit"})
        scores.append(score)
        return choice

    ids = rows if ids is None else np.asarray(ids)[rows]
    r = crossfit(select_fn, lambda c, part: problem.hits(c, part)[1], rows, k=folds, seed=seed, ids=ids)
    record = {"folds": folds, "seed": seed, **{k: getattr(r, k) for k in ("fold_scores", "mean", "low", "high")}}
    record.update(interval=r.interval, choices=[c.record() for c in r.choices])
    return r.choice, scores[-1], record, (ids, r.held_out)

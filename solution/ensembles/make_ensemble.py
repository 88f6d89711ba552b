"""An ensemble run (the work behind ``python -m solution.ensemble``): members in, ``ensemble.json`` out.

Every flag and the output folder are checked before any model loads; then each member is encoded
(:mod:`.members`), the galleries compared, the choice made on the selection queries
(:mod:`.selection`: ``--select-split F`` draws them as the soup does, ``--folds K`` cross-fits;
``flip`` among ``--rerank`` also encodes each member's flipped gallery and tries flip TTA) and
every member and the ensemble scored on the selection, report and all queries. Written last, each
atomically: ``ensemble_log.jsonl`` (one line per candidate tried), ``selection.png`` and
``ensemble.json`` (:mod:`.spec`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from solution.common import SolutionError, check_output, resolve_device, write_jsonl
from solution.ensembles.fusion import NORMS, RERANKERS, check_weights, gold_rows
from solution.formats.hits import write_hits
from solution.formats.muge import read_texts
from solution.retrieval.manifest import now
from solution.retrieval.metrics import query_hits
from solution.retrieval.val_data import ValData

from .members import TTAS, Encoding, check_galleries, encode_member
from .selection import Choice, Plan, Problem, choose
from .spec import LOG_NAME, NAME, PLOT_NAME, write_ensemble

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EnsembleOptions:
    """An ensemble run, as plain values (the command line's flags)."""

    members: tuple
    val_data: str
    output: str
    weights: tuple | None = None
    norm: str = "zscore"
    rerank: tuple = ("none",)
    bank: str | None = None
    bank_topk: int | None = None
    select_split: float | None = None
    folds: int | None = None
    seed: int = 0
    max_rounds: int = 20
    encoding: Encoding = Encoding(device="auto")
    command: tuple = ()


def check_options(o: EnsembleOptions) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Refuse bad flags before any work; the re-rankers and the test-time augmentations to try."""
    if not o.members:
        raise SolutionError("--members is empty")
    if o.weights is not None:
        try:
            check_weights(o.weights, len(o.members))
        except ValueError as e:
            raise SolutionError(f"--weights: {e}") from None
    if o.norm not in NORMS:
        raise SolutionError(f"unknown --norm {o.norm!r}; choose from {', '.join(NORMS)}")
    rerank = tuple(dict.fromkeys(r for r in o.rerank if r != "none"))
    tta = tuple(r for r in rerank if r in TTAS)
    rerank = tuple(r for r in rerank if r not in TTAS)
    bad = [r for r in rerank if r not in RERANKERS]
    if bad:
        raise SolutionError(f"unknown --rerank {bad[0]!r}; choose from {', '.join((*RERANKERS, *TTAS[1:]))}")
    if "qb_norm" in rerank and not o.bank:
        raise SolutionError("--rerank qb_norm needs --bank (a texts JSONL, e.g. the training texts)")
    if o.folds is not None and o.folds < 2:
        raise SolutionError(f"--folds must be at least 2, got {o.folds}")
    if o.max_rounds < 0 or o.encoding.batch_size < 1:
        raise SolutionError("--max-rounds must be >= 0 and --batch-size >= 1")
    return rerank, tta


def _check_split(fraction: float | None, n: int) -> None:
    if fraction is None:
        return
    if not 0 < fraction < 1:
        raise SolutionError(f"--select-split must be a fraction in (0, 1), got {fraction}")
    k = round(fraction * n)
    if k == 0 or k == n:
        raise SolutionError(
            f"--select-split {fraction} of {n} queries leaves an empty {'selection' if k == 0 else 'report'} half"
        )


def _plot(path: Path, members: list, scores: dict, parts: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from solution.plots import save_png

    names = [Path(m.path).parent.parent.name + "/" + Path(m.path).name for m in members] + ["ensemble"]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 3.5))
    width = 0.8 / len(parts)
    for j, part in enumerate(parts):
        vals = [s[part]["mean_recall"] for s in scores["members"]] + [scores[part]["mean_recall"]]
        ax.bar(np.arange(len(names)) + j * width, vals, width, label=part)
    ax.set_xticks(np.arange(len(names)) + width * (len(parts) - 1) / 2, names, rotation=20, fontsize=7)
    ax.set_ylabel("mean recall (%)")
    ax.legend(fontsize=7)
    ax.set_title("members alone vs the ensemble")
    save_png(fig, path)


def _parts(val: ValData, text_ids: list[int]) -> dict[str, np.ndarray]:
    row = {t: i for i, t in enumerate(text_ids)}
    parts = {name: np.asarray([row[t] for t in ids], dtype=np.int64) for name, ids in val.parts().items()}
    return parts


def _score_all(problem: Problem, choice: Choice, parts: dict) -> dict:
    parts = {**parts, "all": parts.get("all", parts["select"])}
    scores = {p: problem.recall(choice, rows) for p, rows in parts.items()}
    n = problem.n_members
    scores["members"] = [
        {p: problem.recall(Choice(tuple(np.eye(n)[i].tolist()), "none"), rows) for p, rows in parts.items()}
        for i in range(n)
    ]
    return scores


def _write_hits(out: Path, problem: Problem, choice: Choice, text_ids: list[int]) -> dict:
    """Per-query hits over every scored validation query, of the ensemble and of each member alone
    (:mod:`solution.formats.hits`, under ``OUT/hits/``): ``{name: path relative to OUT}``."""
    rows = np.asarray([r for r in range(len(text_ids)) if problem.gold[r]], dtype=np.int64)
    ids, gold = [text_ids[r] for r in rows], [problem.gold[r] for r in rows]
    n = problem.n_members
    files = {}
    for name, c in [
        ("ensemble", choice),
        *((f"member{i}", Choice(tuple(np.eye(n)[i].tolist()), "none")) for i in range(n)),
    ]:
        path = write_hits(out / "hits" / name, ids, query_hits(problem.ranked(c, rows), gold))
        files[name] = str(path.relative_to(out))
    return files


def make_ensemble(o: EnsembleOptions) -> dict:
    """Select an ensemble and write its folder; returns the ``ensemble.json`` content."""
    rerankers, tta = check_options(o)
    out = check_output(o.output, inputs=o.members, what="--output", is_dir=True)
    for name in (NAME, LOG_NAME, PLOT_NAME):
        check_output(out / name, inputs=o.members, what="--output's file")
    check_output(out / "hits", what="--output's hits folder", is_dir=True)
    enc = dataclasses.replace(o.encoding, device=resolve_device(o.encoding.device))
    val = ValData(o.val_data, None, None, o.seed)
    _check_split(o.select_split, len(val.queries.text_ids))
    if o.select_split:
        val = ValData(o.val_data, None, o.select_split, o.seed)
    bank = [r.text for r in read_texts(o.bank)] if o.bank else None
    members = [
        encode_member(p, val.split, val.queries.texts, enc, bank_texts=bank, flip="flip" in tta) for p in o.members
    ]
    gallery_ids = check_galleries(members)
    q = val.queries
    problem = Problem(
        [m.queries for m in members],
        [m.gallery for m in members],
        gold_rows(q.text_ids, gallery_ids, q.gold),
        [m.bank for m in members] if bank else None,
        device=enc.device,
        bank_topk=o.bank_topk,
        flipped=[m.gallery_for("flip") for m in members] if tta else None,
    )
    parts = _parts(val, q.text_ids)
    plan = Plan(o.norm, o.weights, rerankers, o.max_rounds, o.bank_topk, tta)
    records: list = []
    choice, select_score, cross = choose(problem, parts["select"], plan, o.folds, o.seed, records)
    scores = _score_all(problem, choice, parts)
    scores.setdefault("report", None)
    spec = {
        "members": [m.record() for m in members],
        **choice.record(),
        "scores": scores,
        "selection_score": select_score,
        "crossfit": cross,
        "val_data": str(Path(o.val_data).resolve()),
        "select_split": o.select_split,
        "seed": o.seed,
        "created": now(),
        "command": list(o.command),
    }
    spec["rerank"].update(bank=str(Path(o.bank).resolve()) if o.bank else None, bank_topk=o.bank_topk)
    out.mkdir(parents=True, exist_ok=True)
    spec["hits"] = _write_hits(out, problem, choice, q.text_ids)
    write_jsonl(out / LOG_NAME, records)
    _plot(out / PLOT_NAME, members, scores, [p for p in ("select", "report") if scores.get(p)])
    write_ensemble(out / NAME, spec)
    log.info(
        "ensemble %s: weights %s, %s, tta %s, re-ranker %s; select %.2f%s",
        out,
        spec["weights"],
        o.norm,
        spec["tta"],
        spec["rerank"]["method"],
        scores["select"]["mean_recall"],
        f", report {scores['report']['mean_recall']:.2f}" if scores.get("report") else "",
    )
    return spec

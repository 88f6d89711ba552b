"""An ensemble run (the work behind ``python -m solution.ensemble``): members in, an ensemble folder out.

Every flag and the output folder are checked before any model loads; then each member is encoded, the
galleries compared, the choice made on the selection queries (:mod:`.selection`) and every member and the
ensemble scored on the selection, report and all queries. Written last, each atomically: the per-query
hits, the log of candidates, the plot and ``ensemble.json`` (:mod:`.spec`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from solution.common import SolutionError, check_output, resolve_device, write_jsonl
from solution.ensembles.fusion import NORMS, RERANKERS, check_weights
from solution.formats.hits import write_hits
from solution.formats.muge import read_texts
from solution.retrieval.manifest import now
from solution.retrieval.val_data import ValData

from .members import TTAS, Encoding, check_galleries, encode_member
from .selection import Plan, Problem, choose
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


def check_options(o: EnsembleOptions) -> Plan:
    """Refuse bad flags before any work; what to choose."""
    if not o.members:
        raise SolutionError("--members is empty")
    if o.weights is not None:
        try:
            check_weights(o.weights, len(o.members))
        except ValueError as e:
            raise SolutionError(f"--weights: {e}") from None
    if o.norm not in NORMS:
        raise SolutionError(f"unknown --norm {o.norm!r}; choose from {', '.join(NORMS)}")
    tried = tuple(dict.fromkeys(r for r in o.rerank if r != "none"))
    bad = [r for r in tried if r not in RERANKERS + TTAS]
    if bad:
        raise SolutionError(f"unknown --rerank {bad[0]!r}; choose from {', '.join((*RERANKERS, *TTAS[1:]))}")
    if "qb_norm" in tried and not o.bank:
        raise SolutionError("--rerank qb_norm needs --bank (a texts JSONL, e.g. the training texts)")
    if o.folds is not None and o.folds < 2:
        raise SolutionError(f"--folds must be at least 2, got {o.folds}")
    if o.max_rounds < 0 or o.encoding.batch_size < 1:
        raise SolutionError("--max-rounds must be >= 0 and --batch-size >= 1")
    rerankers, tta = tuple(r for r in tried if r not in TTAS), tuple(r for r in tried if r in TTAS)
    return Plan(o.norm, o.weights, rerankers, o.max_rounds, tta)


def gold_rows(query_ids, gallery_ids, gold) -> list[set[int]]:
    """Gold gallery *indices* per query row from ``{query id: [gallery ids]}``; ids not in the gallery dropped."""
    where = {int(g): i for i, g in enumerate(np.asarray(gallery_ids).tolist())}
    out = [{where[int(g)] for g in gold[int(q)] if int(g) in where} for q in query_ids]
    missing = sum(len(gold[int(q)]) for q in query_ids) - sum(map(len, out))
    if missing:
        log.warning(f"{missing} gold ids are not in the gallery: those pairs can never be hit")
    return out


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


def make_ensemble(o: EnsembleOptions) -> dict:
    """Select an ensemble and write its folder; returns the ``ensemble.json`` content."""
    plan = check_options(o)
    out = check_output(o.output, inputs=o.members, what="--output", is_dir=True)
    for name in (NAME, LOG_NAME, PLOT_NAME):
        check_output(out / name, inputs=o.members, what="--output's file")
    check_output(out / "hits", what="--output's hits folder", is_dir=True)
    enc = dataclasses.replace(o.encoding, device=resolve_device(o.encoding.device))
    val = ValData(o.val_data, None, o.select_split, o.seed)
    q = val.queries
    if o.select_split is not None and round(o.select_split * len(q.text_ids)) in (0, len(q.text_ids)):
        half = "selection" if round(o.select_split * len(q.text_ids)) == 0 else "report"
        raise SolutionError(f"--select-split {o.select_split} of {len(q.text_ids)} queries leaves an empty {half} half")
    bank = [r.text for r in read_texts(o.bank)] if o.bank else None
    members = [encode_member(p, val.split, q.texts, enc, bank_texts=bank, flip=bool(plan.tta)) for p in o.members]
    gold = gold_rows(q.text_ids, check_galleries(members), q.gold)
    problem = Problem(
        [m.queries for m in members],
        [m.gallery for m in members],
        gold,
        [m.bank for m in members] if bank else None,
        device=enc.device,
        bank_topk=o.bank_topk,
        flipped=[m.gallery_for("flip") for m in members] if plan.tta else None,
    )
    row = {t: i for i, t in enumerate(q.text_ids)}
    parts = {name: np.asarray([row[t] for t in ids], dtype=np.int64) for name, ids in val.parts().items()}
    parts.setdefault("all", parts["select"])
    records: list = []
    choice, select_score, cross = choose(problem, parts["select"], plan, o.folds, o.seed, records)
    scores = {p: problem.recall(choice, rows) for p, rows in parts.items()}
    scores["members"] = [
        {p: problem.recall(problem.alone(i), r) for p, r in parts.items()} for i in range(len(members))
    ]
    scores.setdefault("report", None)
    out.mkdir(parents=True, exist_ok=True)
    hits = {}
    for name, c in [("ensemble", choice), *((f"member{i}", problem.alone(i)) for i in range(len(members)))]:
        rows, h = problem.hits(c, parts["all"])
        hits[name] = str(write_hits(out / "hits" / name, [q.text_ids[r] for r in rows], h).relative_to(out))
    spec = {
        "members": [m.record() for m in members],
        **choice.record(),
        "scores": scores,
        "selection_score": select_score,
        "crossfit": cross,
        "hits": hits,
        "val_data": str(Path(o.val_data).resolve()),
        "select_split": o.select_split,
        "seed": o.seed,
        "created": now(),
        "command": list(o.command),
    }
    spec["rerank"].update(bank=str(Path(o.bank).resolve()) if o.bank else None, bank_topk=o.bank_topk)
    write_jsonl(out / LOG_NAME, records)
    _plot(out / PLOT_NAME, members, scores, [p for p in ("select", "report") if scores.get(p)])
    write_ensemble(out / NAME, spec)
    report = f", report {scores['report']['mean_recall']:.2f}" if scores["report"] else ""
    log.info(
        f"ensemble {out}: weights {spec['weights']}, {o.norm}, tta {spec['tta']}, re-ranker "
        f"{spec['rerank']['method']}; select {scores['select']['mean_recall']:.2f}{report}"
    )
    return spec

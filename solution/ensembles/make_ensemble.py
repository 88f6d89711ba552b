"""Making an ensemble (``python -m solution.ensemble``) and its submission (``predict --ensemble``).

Flags, members and data are checked before any model is built (at prediction, every member and the qb_norm bank
against ``ensemble.json``). An ensemble folder is claimed and locked for its run; written last: the per-query hits
(with ``--folds``, the held-out ones too), the log of candidates and ``ensemble.json``; hits an earlier run wrote
and this one does not are removed. One member without a re-ranker ranks as plain ``predict`` ranks its features.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from solution.common import SolutionError, check_output, folder_lock, remove_stale_temps, resolve_device, write_jsonl
from solution.data.lmdb_io import LMDBSplit
from solution.ensembles.fusion import FUSION_MEMORY_MB, RERANKERS, check_weights, fusion_chunk
from solution.formats.hits import write_hits
from solution.formats.kinds import claim_folder
from solution.formats.muge import read_texts
from solution.retrieval.rank import auto_chunk, file_sha256, now, prediction_rows, submission_paths, write_submission
from solution.retrieval.val_data import ValData

from .selection import Choice, Plan, Problem, choose
from .spec import LOG_NAME, NAME, TTAS, encode_members, open_member, read_ensemble, write_ensemble

log = logging.getLogger(__name__)

LOCK = ".ensemble.lock"


def check_options(o) -> Plan:
    """Refuse bad flags (``python -m solution.ensemble``'s) before any work; what to choose."""
    if not o.members or not str(o.output).strip():
        raise SolutionError("--members and --output must not be empty")
    if o.weights is not None:
        try:
            check_weights(o.weights, len(o.members))
        except ValueError as e:
            raise SolutionError(f"--weights: {e}") from None
    rerank = [r.strip() for r in o.rerank.split(",")]
    bad = [r for r in rerank if r not in RERANKERS + TTAS]
    if bad:
        raise SolutionError(f"unknown --rerank {bad[0]!r}; choose from {', '.join((*RERANKERS, *TTAS[1:]))}")
    tried = tuple(dict.fromkeys(r for r in rerank if r != "none"))
    if "qb_norm" in tried and not o.bank:
        raise SolutionError("--rerank qb_norm needs --bank (a texts JSONL, e.g. the training texts)")
    if (o.folds is not None and o.folds < 2) or o.max_rounds < 0 or o.batch_size < 1:
        raise SolutionError("--folds must be at least 2, --max-rounds at least 0 and --batch-size at least 1")
    if o.bank_topk is not None and o.bank_topk < 1:
        raise SolutionError(f"--bank-topk must be at least 1, got {o.bank_topk}")
    if o.folds and o.select_split:
        raise SolutionError("--folds cross-fits over every validation query: use it without --select-split")
    rerankers, tta = tuple(r for r in tried if r not in TTAS), tuple(r for r in tried if r in TTAS)
    return Plan(o.norm, o.weights, rerankers, o.max_rounds, tta)


def make_ensemble(o, command: Sequence[str] = ()) -> dict:
    """Select an ensemble (flags as parsed by :mod:`solution.ensemble`) and write its folder; returns the
    ``ensemble.json`` content."""
    plan = check_options(o)
    out = check_output(o.output, inputs=o.members, what="--output", is_dir=True)
    enc = dict(device=resolve_device(o.device), precision=o.precision, batch_size=o.batch_size)
    opened = [open_member(p, o.context_length) for p in o.members]
    val = ValData(o.val_data, None, o.select_split, o.seed)
    n = len(val.queries.text_ids)
    if o.select_split is not None and round(o.select_split * n) in (0, n):
        half = "selection" if round(o.select_split * n) == 0 else "report"
        raise SolutionError(f"--select-split {o.select_split} of {n} queries leaves an empty {half} half")
    if o.folds and o.folds > len(val.select):
        raise SolutionError(f"--folds {o.folds}: need 2 <= K <= {len(val.select)} (the selection queries)")
    bank = [r.text for r in read_texts(o.bank)] if o.bank else None
    created = not out.exists()
    claim_folder(out, "ensemble")
    with folder_lock(out / LOCK, f"ensemble folder {out}"):
        try:
            remove_stale_temps(out, recursive=True)
            encode_members(
                opened,
                val.split,
                val.queries.texts,
                cache_dir=o.cache_dir or None,
                bank_texts=bank,
                flip=bool(plan.tta),
                **enc,
            )
            return _select_and_write(o, plan, out, enc["device"], opened, val, command)
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise


def _select_and_write(o, plan: Plan, out: Path, device, members: list, val: ValData, command) -> dict:
    q = val.queries
    problem = Problem.of(members, q.text_ids, q.gold, device=device, bank_topk=o.bank_topk)
    row = {t: i for i, t in enumerate(q.text_ids)}
    parts = {name: np.asarray([row[t] for t in ids], dtype=np.int64) for name, ids in val.parts().items()}
    parts.setdefault("all", parts["select"])
    records: list = []
    choice, _, cross, held_out = choose(problem, parts["select"], plan, o.folds, o.seed, records, q.text_ids)
    scores = {p: problem.recall(choice, rows) for p, rows in parts.items()}
    scores["members"] = [
        {p: problem.recall(problem.alone(i), r) for p, r in parts.items()} for i in range(len(members))
    ]
    scores.setdefault("report", None)
    hits = {}
    for name, c in [("ensemble", choice), *((f"member{i}", problem.alone(i)) for i in range(len(members)))]:
        rows, h = problem.hits(c, parts["all"])
        hits[name] = str(write_hits(out / "hits" / name, [q.text_ids[r] for r in rows], h).relative_to(out))
    if cross:
        hits["crossfit"] = cross["hits"] = str(write_hits(out / "hits" / "crossfit", *held_out).relative_to(out))
        cross["refit_mean_recall"] = scores["all"]["mean_recall"]
    for p in (out / "hits").iterdir():  # an earlier run's member hits this one does not write
        if p.name.split(".hits")[0] not in hits:
            p.unlink()
    spec = {
        "members": [m.record for m in members],
        **choice.record(),
        "precision": o.precision,
        "scores": scores,
        "crossfit": cross,
        "hits": hits,
        "val_data": str(Path(o.val_data).resolve()),
        "select_split": o.select_split,
        "seed": o.seed,
        "created": now(),
        "command": list(command),
    }
    bank = dict(bank=str(Path(o.bank).resolve()), bank_sha256=file_sha256(o.bank)) if o.bank else dict(bank=None)
    spec["rerank"].update(bank, bank_topk=o.bank_topk)
    write_jsonl(out / LOG_NAME, records)
    write_ensemble(out / NAME, spec)
    log.info(f"ensemble {out}: {choice.record()}; mean recall {scores['all']['mean_recall']:.2f} on all queries")
    return spec


def _check_bank(path, spec: dict, recorded: list) -> list | None:
    """The qb_norm bank's texts when it re-ranks, checked against its digest; old files are said to be unchecked."""
    rr = spec["rerank"]
    qb = rr["method"] == "qb_norm" and rr["temperature"] > 0
    if qb and rr.get("bank_sha256") not in (None, file_sha256(rr["bank"])):
        raise SolutionError(f"{path}: the qb_norm bank {rr['bank']} changed since selection: select the ensemble again")
    if any("config_sha256" not in m for m in recorded) or (qb and "bank_sha256" not in rr):
        log.warning(f"{path} predates config digests: members and bank are checked only as far as it records them")
    return [r.text for r in read_texts(rr["bank"])] if qb else None


def predict_ensemble(a, command) -> dict:
    """Write the submission of ``a.ensemble`` (flags as parsed by :mod:`solution.predict`) and its manifest."""
    t0 = time.perf_counter()
    spec = read_ensemble(a.ensemble)
    used, rr = [i for i, w in enumerate(spec["weights"]) if w > 0], spec["rerank"]
    inputs = [a.ensemble, a.text_data, *(m["path"] for m in spec["members"])]
    output, mpath = submission_paths(a.output, inputs)
    records, split = read_texts(a.text_data), LMDBSplit(a.image_data, need_pairs=False)
    recorded = [spec["members"][i] for i in used]
    members = [open_member(m["path"], m.get("context_length"), m) for m in recorded]
    bank = _check_bank(a.ensemble, spec, recorded)
    enc = dict(device=a.device, precision=spec.get("precision", "amp"), batch_size=64, cache_dir=a.cache_dir or None)
    texts, flip = [r.text for r in records], spec["tta"] == "flip"
    gallery_ids = encode_members(members, split, texts, bank_texts=bank, flip=flip, **enc)
    if a.top_k > len(gallery_ids):
        raise SolutionError(f"top-{a.top_k} asked but the gallery has only {len(gallery_ids)} items")
    weights = [spec["weights"][i] for i in used]
    single = len(members) == 1 and not (rr["method"] != "none" and rr["temperature"] > 0)
    norm, nt = ("none" if single else spec["norm"]), float(spec.get("norm_temperature") or 1.0)
    choice = Choice(tuple(weights), norm, nt, rr["method"], float(rr["temperature"]), spec["tta"])
    chunk = a.chunk_size or (
        auto_chunk(len(gallery_ids)) if single else fusion_chunk(len(gallery_ids), FUSION_MEMORY_MB, norm)
    )
    problem = Problem.of(members, [], {}, device=a.device, bank_topk=rr["bank_topk"])
    ranked = gallery_ids[problem.ranked(choice, np.arange(len(records)), a.top_k, chunk)].astype(np.int64)
    checkpoints = [{"path": m["path"], "fingerprint": m["fingerprint"], "weight": w} for m, w in zip(recorded, weights)]
    image = {"data": str(split.split_dir.resolve() / "imgs"), "cache": [m.cache for m in members]}
    if choice.tta == "flip":
        image["flip_cache"] = [m.flip_cache for m in members]
    ensemble = {k: spec.get(k) for k in ("weights", "norm", "norm_temperature", "tta", "precision", "rerank")}
    manifest = {
        "submission": str(output.resolve()),
        "direction": "t2i",
        "top_k": a.top_k,
        "gallery_size": len(gallery_ids),
        "checkpoints": checkpoints,
        "features": {"text": {"data": str(Path(a.text_data).resolve())}, "image": image},
        "ensemble": {"path": str(Path(a.ensemble).resolve()), **ensemble, "weights": weights},
        "validation": (spec.get("scores") or {}).get("all"),
        "ranking": {"method": "fp32" if single else "fusion", "chunk_size": chunk},
        "created": now(),
        "seconds": round(time.perf_counter() - t0, 3),
        "command": list(command),
    }
    return write_submission(output, mpath, prediction_rows("t2i", [r.text_id for r in records], ranked), manifest)

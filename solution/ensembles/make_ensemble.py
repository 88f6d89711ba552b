"""Score-level ensembles: making one (``python -m solution.ensemble``, ``ensemble.json`` written last) and its
submission. A member is a checkpoint read and checked (at prediction against its record in ``ensemble.json``),
then encoded with its own config, its gallery through the image-feature cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cn_clip_patch.prompt import PromptError, check_prompt
from solution.common import SolutionError, check_output, folder_lock, remove_stale_temps, write_json, write_jsonl
from solution.data.lmdb_io import LMDBSplit
from solution.formats.hits import write_hits
from solution.formats.kinds import ENSEMBLE_SPEC, claim_folder
from solution.formats.muge import read_texts
from solution.model import (
    ModelConfig,
    fingerprint,
    load_weights,
    meta_model,
    read_checkpoint,
    refuse_unmerged_lora,
    resolve_config,
)
from solution.plots import candidate_scores
from solution.retrieval.encode import ValData, encode_texts
from solution.retrieval.extract import cached_image_features
from solution.retrieval.rank import auto_chunk, file_sha256, now, prediction_rows, submission_paths, write_submission

from .fusion import FUSION_MEMORY_MB, NORMS, RERANKERS, Choice, Plan, Problem, check_weights, choose, fusion_chunk

log = logging.getLogger(__name__)

TTAS = ("none", "flip")
NAME, LOG_NAME, LOCK = ENSEMBLE_SPEC, "ensemble_log.jsonl", ".ensemble.lock"
VERSION = 1
RERANK = {"method": "none", "temperature": 0.0, "bank": None, "bank_topk": None}


@dataclasses.dataclass
class Member:
    """A member read and checked (:func:`open_member`), then encoded (:func:`encode_members`): ``queries [Q, D]``
    and ``bank [B, D]`` (texts) against ``gallery [G, D]`` (images)."""

    path: str
    ckpt: dict | None  # until encoded
    config: ModelConfig
    record: dict
    gallery_ids: np.ndarray | None = None
    gallery: np.ndarray | None = None
    queries: np.ndarray | None = None
    bank: np.ndarray | None = None
    cache: str = "off"
    flipped: np.ndarray | None = None  # flip TTA's gallery: plain + mirrored images' features, unit length
    flip_cache: str | None = None


def flip_average(plain: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    s = np.asarray(plain, dtype=np.float32) + np.asarray(flipped, dtype=np.float32)
    return s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), np.float32(1e-12))


def member_record(path: str, ckpt: dict, config: ModelConfig) -> dict:
    """What ``ensemble.json`` says about a member: its weights' fingerprint and everything that changes its
    features (``config_sha256``: the config without its tuning record)."""
    features = {k: v for k, v in config.to_dict().items() if k != "tuning"}
    return {
        "path": str(Path(path).resolve()),
        "fingerprint": fingerprint(ckpt),
        "arch": config.arch,
        **{k: getattr(config, k) for k in ("vision_model", "text_model", "context_length", "text_prompt")},
        "image_resolution": config.image_resolution,
        "embed_dim": int(config.model_info["embed_dim"]),
        "config_sha256": hashlib.sha256(json.dumps(features, sort_keys=True).encode()).hexdigest(),
    }


def open_member(path: str, context_length: int | None = None, recorded: dict | None = None) -> Member:
    """Read and check a member before any model is built; ``recorded``: its ``ensemble.json`` entry, which every
    field of its record must still match. ``context_length``: for a checkpoint without a stored config."""
    try:
        ckpt = read_checkpoint(path)
        if set(ckpt) == {"state_dict"} and context_length is None:
            raise SolutionError("it holds bare weights: its context length cannot be known; pass --context-length")
        config = resolve_config(ckpt, source=str(path), context_length=None if ckpt.get("config") else context_length)
        refuse_unmerged_lora(config, ckpt["state_dict"], "it")
        check_prompt(config.text_prompt, config.context_length)
    except (SolutionError, PromptError) as e:
        raise SolutionError(f"member {path}: {e}") from None
    record = member_record(path, ckpt, config)
    changed = [k for k, v in (recorded or {}).items() if k in record and k != "path" and record[k] != v]
    if changed:
        what = ", ".join("its weights" if k == "fingerprint" else k for k in changed)
        raise SolutionError(f"ensemble member {path} changed since selection ({what}): select the ensemble again")
    return Member(str(path), ckpt, config, record)


def encode_members(
    members: Sequence[Member], split: LMDBSplit, texts: Sequence[str], *, cache_dir, bank_texts=None, flip=False, **kw
):
    """Encode each member's gallery of the split through the cache (``flip``: its mirrored images too), the query
    ``texts`` and the ``bank_texts``; returns the gallery ids they share (members whose galleries differ refused)."""
    for m in members:
        try:
            model = meta_model(m.config)  # no random init: every tensor comes from the checkpoint
            load_weights(model, m.ckpt["state_dict"], m.config, m.path)
            model.to(kw["device"])
            m.gallery_ids, m.gallery, info = cached_image_features(model, split, m.config, cache_dir=cache_dir, **kw)
            m.cache = info["cache"]
            if flip:
                ids, flipped, info = cached_image_features(model, split, m.config, cache_dir=cache_dir, flip=True, **kw)
                if not np.array_equal(ids, m.gallery_ids):
                    raise SolutionError(f"its flipped images decode as {len(ids)} images, not {len(m.gallery_ids)}")
                m.flipped, m.flip_cache = flip_average(m.gallery, flipped), info["cache"]
            m.queries = encode_texts(model, texts, m.config, **kw)
            m.bank = encode_texts(model, bank_texts, m.config, **kw) if bank_texts is not None else None
        except (SolutionError, OSError, RuntimeError, ValueError, KeyError) as e:
            raise SolutionError(f"member {m.path} cannot encode {split.split_dir}: {e}") from None
        m.ckpt = None
        log.info(
            f"member {m.path}: {len(m.queries)} queries, {len(m.gallery_ids)} images ({m.cache}, flip {m.flip_cache})"
        )
        if not np.array_equal(m.gallery_ids, members[0].gallery_ids):
            raise SolutionError(
                f"members {members[0].path} and {m.path} hold different galleries ({len(members[0].gallery_ids)} "
                f"vs {len(m.gallery_ids)} images, or the same ids in another order)"
            )
    return members[0].gallery_ids


def _number(x, low: float = 0.0) -> bool:
    """A finite number ``>= low`` (``> 0`` when ``low`` is None)."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return ok and (x > 0 if low is None else x >= low)


def read_ensemble(path: str | os.PathLike) -> dict:
    """A checked ``ensemble.json``, defaults filled in; one error line for anything it cannot be."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise SolutionError(f"ensemble file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SolutionError(f"{path} is not a readable ensemble.json: {e}") from None
    if not isinstance(spec, dict) or spec.get("version", VERSION) != VERSION:
        version = spec.get("version") if isinstance(spec, dict) else None
        raise SolutionError(f"{path}: unknown ensemble.json version {version!r} (this toolkit reads {VERSION})")
    members = spec.get("members") if isinstance(spec.get("members"), list) else []
    if not members or not all(
        isinstance(m, dict) and isinstance(m.get("path"), str) and m.get("fingerprint") for m in members
    ):
        raise SolutionError(f"{path}: it needs members, each with a path and a fingerprint")
    try:
        spec["weights"] = check_weights(spec.get("weights"), len(members)).tolist()
    except (ValueError, TypeError) as e:
        raise SolutionError(f"{path}: {e}") from None
    if not isinstance(spec.get("rerank") or {}, dict):
        raise SolutionError(f"{path}: rerank must be an object {{method, temperature, ...}}, got {spec['rerank']!r}")
    rr = spec["rerank"] = {**RERANK, **(spec.get("rerank") or {})}
    norm, t, topk, spec["tta"] = spec.get("norm"), rr["temperature"], rr["bank_topk"], spec.get("tta") or "none"
    bad_topk = topk is not None and not (isinstance(topk, int) and _number(topk, 1))
    for bad, what in (
        (norm not in NORMS, f"unknown normalisation {norm!r}"),
        (norm == "softmax" and not _number(spec.get("norm_temperature"), None), "softmax needs a norm_temperature > 0"),
        (rr["method"] not in RERANKERS, f"unknown re-ranker {rr['method']!r}"),
        (not _number(t), f"the re-ranking temperature must be a number >= 0, got {t!r}"),
        (bad_topk, f"bank_topk {topk!r} is not an int >= 1"),
        (rr["method"] == "qb_norm" and t != 0 and not isinstance(rr["bank"], str), "qb_norm needs its bank (JSONL)"),
        (spec["tta"] not in TTAS, f"unknown test-time augmentation {spec['tta']!r}; choose from {', '.join(TTAS)}"),
    ):
        if bad:
            raise SolutionError(f"{path}: {what}")
    return spec


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
    enc = dict(device=o.device, precision=o.precision, batch_size=o.batch_size, cache_dir=o.cache_dir or None)
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
            encode_members(opened, val.split, val.queries.texts, bank_texts=bank, flip=bool(plan.tta), **enc)
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
    if o.report_to == "tensorboard":  # the refit's candidates by stage, in the order tried
        refit = [r for r in records if r.get("fold") in (None, "refit")]
        candidate_scores(
            out, {f"{s}/score": [r["score"] for r in refit if r["stage"] == s] for s in {r["stage"] for r in refit}}
        )
    write_json(out / NAME, {"version": VERSION, **spec})
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
    size = len(gallery_ids)
    chunk = a.chunk_size or (auto_chunk(size) if single else fusion_chunk(size, FUSION_MEMORY_MB, norm))
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

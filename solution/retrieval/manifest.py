"""Provenance: what a feature file's ``BASE.meta.json`` and a submission's manifest ``NAME.json`` record.

A feature file records the checkpoint (path + sha256), config, prompt, precision, device and the
checkpoint's validation score when it can be known (:func:`checkpoint_validation`: stored in the
checkpoint, else the main-set ``valid`` record at its step in the run's ``metrics.jsonl``, read by
:func:`solution.formats.run_files.read_metrics`). A submission's manifest gathers the provenance of
both feature files, the validation score (``--valid-score`` first) and the command.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from solution.common import SolutionError
from solution.formats.feature_files import FeatureSet
from solution.formats.run_files import METRICS, main_valid, read_metrics
from solution.model import ModelConfig

from .metrics import RECALL_KEYS

log = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def checkpoint_validation(path: str | os.PathLike, ckpt: dict) -> dict | None:
    """The validation score of a checkpoint when it can be known, else None.

    Looked for in the checkpoint (a dict holding ``mean_recall`` under a few usual keys), then in
    its run directory's ``metrics.jsonl`` (the last main-set ``valid`` record at the checkpoint's
    step). A malformed ``metrics.jsonl`` is an error naming file and line (a last line torn by a
    kill is skipped with a warning).
    """
    for name in ("metrics", "valid", "validation", "val_metrics"):  # not "best": a resumable checkpoint's best-so-far
        v = ckpt.get(name)
        if isinstance(v, dict) and "mean_recall" in v:
            return {**{k: v[k] for k in RECALL_KEYS if k in v}, "source": f"checkpoint[{name!r}]"}
    ckpt_dir = Path(path).resolve().parent
    metrics = ckpt_dir.parent / METRICS
    if ckpt_dir.name != "checkpoints" or "step" not in ckpt:
        return None
    found = [r for r in main_valid(read_metrics(metrics)) if r.get("step") == ckpt["step"]]
    if not found:
        return None
    row = found[-1]
    return {
        **{k: row[k] for k in RECALL_KEYS if k in row},
        "step": row.get("step"),
        "epoch": row.get("epoch"),
        "source": str(metrics),
    }


def feature_provenance(
    checkpoint: str | os.PathLike, ckpt: dict, config: ModelConfig, *, precision: str, device
) -> dict:
    """What every feature file of one extraction records about its model."""
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": file_sha256(checkpoint),
        "config": config.to_dict(),
        "prompt": config.text_prompt,
        "context_length": config.context_length,
        "precision": precision,
        "device": str(device),
        "validation": checkpoint_validation(checkpoint, ckpt),
        "created": now(),
    }


def manifest_path(output: str | Path) -> Path:
    """The manifest beside a submission: ``NAME.json`` for ``NAME.jsonl``."""
    output = Path(output)
    if output.suffix == ".json":
        raise SolutionError(f"--output {output} ends in .json, the manifest's name; use .jsonl")
    return output.with_suffix(".json")


def parse_score(text: str | None) -> dict | None:
    """``--valid-score``: a mean recall, or a JSON object of r1/r5/r10/mean_recall (None when not given)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise SolutionError(f"--valid-score {text!r}: give a number (mean recall) or a JSON object") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"mean_recall": float(value), "source": "--valid-score"}
    if isinstance(value, dict):
        return {**value, "source": "--valid-score"}
    raise SolutionError(f"--valid-score {text!r}: give a number (mean recall) or a JSON object")


def _feature_entry(fs: FeatureSet) -> dict:
    m = fs.meta
    return {
        "path": str(fs.path.resolve()),
        "format": fs.format,
        "count": len(fs.ids),
        "dim": int(fs.feats.shape[1]),
        **{k: m[k] for k in ("checkpoint", "checkpoint_sha256", "precision", "data", "cache", "created") if k in m},
    }


def _checkpoints(texts: FeatureSet, images: FeatureSet, named: Sequence[str]) -> list[dict]:
    """The checkpoints the features came from (each once, with what it was used for), then ``named``."""
    checkpoints, seen = [], set()
    for fs in (texts, images):
        c = fs.meta.get("checkpoint")
        sha = fs.meta.get("checkpoint_sha256")
        if c and (c, sha) not in seen:
            seen.add((c, sha))
            checkpoints.append({"path": c, "sha256": sha, "used_for": [fs.kind]})
        elif c:
            next(x for x in checkpoints if (x["path"], x["sha256"]) == (c, sha))["used_for"].append(fs.kind)
    for c in named:
        checkpoints.append({"path": str(Path(c).resolve()), "sha256": None, "used_for": ["--checkpoint"]})
    shas = {fs.meta.get("checkpoint_sha256") for fs in (texts, images) if fs.meta.get("checkpoint_sha256")}
    if len(shas) > 1:
        log.warning(
            "text and image features come from different checkpoints: %s",
            " vs ".join(f"{fs.kind}: {fs.meta.get('checkpoint')}" for fs in (texts, images)),
        )
    return checkpoints


def build_manifest(
    texts: FeatureSet,
    images: FeatureSet,
    output: Path,
    *,
    direction: str,
    top_k: int,
    valid_score: dict | None,
    checkpoints: Sequence[str],
    command: Sequence[str],
    seconds: float,
) -> dict:
    """A submission's manifest: what it ranked, with what, and how well that scored on validation."""
    validation = valid_score or texts.meta.get("validation") or images.meta.get("validation")
    config = texts.meta.get("config") or images.meta.get("config")
    return {
        "submission": str(output.resolve()),
        "direction": direction,
        "top_k": top_k,
        "num_queries": int(len(texts.ids) if direction == "t2i" else len(images.ids)),
        "gallery_size": int(len(images.ids) if direction == "t2i" else len(texts.ids)),
        "checkpoints": _checkpoints(texts, images, checkpoints),
        "config": config,
        "prompt": texts.meta.get("prompt", config.get("text_prompt") if config else None),
        "features": {"text": _feature_entry(texts), "image": _feature_entry(images)},
        "validation": validation,
        "created": now(),
        "seconds": round(seconds, 3),
        "command": list(command),
    }

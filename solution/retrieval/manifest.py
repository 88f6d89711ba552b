"""Provenance: what a feature file's ``BASE.meta.json`` and a submission's manifest ``NAME.json`` record; and
the lock taken while an output is written."""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from solution.common import SolutionError, folder_lock
from solution.formats.feature_files import FeatureSet
from solution.formats.run_files import METRICS, main_valid, read_metrics
from solution.model import ModelConfig

from .metrics import RECALL_KEYS


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:
        raise SolutionError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest()


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_json_head(path: str | os.PathLike, whole: bool = True) -> dict:
    """An existing file's JSON object (``whole``; else its first line's), or {} when it holds none: what tells an
    earlier output of ours from a file of another kind (a checkpoint, an LMDB, a user's file)."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read(1 << 24) if whole else f.readline(1 << 24))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


@contextlib.contextmanager
def output_lock(paths: Sequence[Path]):
    """A lock on the first of ``paths`` (``.NAME.lock`` beside it) for the block, after removing the temporary
    files a killed writer of any of them left (no live writer can own them under the lock)."""
    paths = [Path(p) for p in paths]
    with folder_lock(paths[0].parent / f".{paths[0].name}.lock", str(paths[0])):
        for p in paths:
            for tmp in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
                tmp.unlink(missing_ok=True)
        yield


def checkpoint_validation(path: str | os.PathLike, ckpt: dict) -> dict | None:
    """A checkpoint's validation score: stored in it (``mean_recall`` under a usual key; not ``best``), else the
    run's last main-set ``valid`` record at its step in ``metrics.jsonl`` beside ``checkpoints/``; or None."""
    for name in ("metrics", "valid", "validation", "val_metrics"):
        v = ckpt.get(name)
        if isinstance(v, dict) and "mean_recall" in v:
            return {**{k: v[k] for k in RECALL_KEYS if k in v}, "source": f"checkpoint[{name!r}]"}
    ckpt_dir = Path(path).resolve().parent
    if ckpt_dir.name != "checkpoints" or "step" not in ckpt:
        return None
    metrics = ckpt_dir.parent / METRICS
    found = [r for r in main_valid(read_metrics(metrics)) if r.get("step") == ckpt["step"]]
    if not found:
        return None
    row = found[-1]
    return {
        **{k: row[k] for k in (*RECALL_KEYS, "step") if k in row},
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


def parse_score(text: str) -> dict:
    """``--valid-score``: a mean recall, or a JSON object of r1/r5/r10/mean_recall."""
    with contextlib.suppress(json.JSONDecodeError):
        value = json.loads(text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"mean_recall": float(value), "source": "--valid-score"}
        if isinstance(value, dict):
            return {**value, "source": "--valid-score"}
    raise SolutionError(f"--valid-score {text!r}: give a number (mean recall) or a JSON object")


def _feature_entry(fs: FeatureSet) -> dict:
    kept = ("checkpoint", "checkpoint_sha256", "precision", "data", "cache", "created")
    return {
        "path": str(fs.path.resolve()),
        "format": fs.format,
        "count": len(fs.ids),
        "dim": int(fs.feats.shape[1]),
        **{k: fs.meta[k] for k in kept if k in fs.meta},
    }


def _checkpoints(texts: FeatureSet, images: FeatureSet, named: Sequence[str]) -> list[dict]:
    """The checkpoints the features came from (each once, with what it was used for), then ``named``."""
    used: dict[tuple, list[str]] = {}
    for fs in (texts, images):
        if fs.meta.get("checkpoint"):
            used.setdefault((fs.meta["checkpoint"], fs.meta.get("checkpoint_sha256")), []).append(fs.kind)
    return [{"path": c, "sha256": sha, "used_for": kinds} for (c, sha), kinds in used.items()] + [
        {"path": str(Path(c).resolve()), "sha256": None, "used_for": ["--checkpoint"]} for c in named
    ]


def build_manifest(texts: FeatureSet, images: FeatureSet, output: Path, *, direction: str, valid_score, **recorded):
    """A submission's manifest: what it ranked, with what, how well that scored on validation, and the
    ``recorded`` fields (``top_k``, ``checkpoints`` named, ``command``, ``seconds``, ``ranking``)."""
    config = texts.meta.get("config") or images.meta.get("config")
    queries, gallery = (texts, images) if direction == "t2i" else (images, texts)
    return {
        "submission": str(output.resolve()),
        "direction": direction,
        "top_k": recorded.pop("top_k"),
        "num_queries": len(queries.ids),
        "gallery_size": len(gallery.ids),
        "checkpoints": _checkpoints(texts, images, recorded.pop("checkpoints", ())),
        "config": config,
        "prompt": texts.meta.get("prompt", config.get("text_prompt") if config else None),
        "features": {"text": _feature_entry(texts), "image": _feature_entry(images)},
        "validation": valid_score or texts.meta.get("validation") or images.meta.get("validation"),
        "created": now(),
        "seconds": round(recorded.pop("seconds"), 3),
        "command": list(recorded.pop("command", ())),
        **recorded,
    }

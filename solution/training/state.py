"""A run folder ``{logs}/{name}/``: its lock, checkpoints (``epoch_latest.pt`` with the optimizer and the
``train_state`` an exact resume needs; LoRA adapters apart in ``adapters/``), RNG states, metrics and plot."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from cn_clip_patch.tuning import adapter_state_dict, has_lora, merged_state_dict, unwrap
from solution.common import (
    SolutionError,
    atomic_path,
    check_output,
    disk_full_as_error,
    folder_lock,
    remove_stale_temps,
)
from solution.formats.run_files import (
    BEST_CHECKPOINT,
    LATEST_CHECKPOINT,
    METRICS,
    append_metric,
    read_metrics,
    rewrite_metrics,
)
from solution.model import ModelConfig, save_checkpoint
from solution.plots import plot_run

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"


def claim_run_folder(stack: contextlib.ExitStack, run_dir: Path, logs: str | os.PathLike) -> None:
    """Lock the run folder for this process until ``stack`` closes (an ``flock``: the kernel drops it when its
    holder dies, even by ``kill -9``), then remove the temporary files a killed writer left in it."""
    check_output(logs, what="--logs", is_dir=True)
    check_output(run_dir, what="run folder", is_dir=True)
    try:
        with disk_full_as_error(run_dir / LOCK_NAME):
            stack.enter_context(folder_lock(run_dir / LOCK_NAME, f"run folder {run_dir}"))
    except PermissionError as e:
        raise SolutionError(f"cannot write in run folder {run_dir}: {e.strerror} ({e.filename})") from None
    remove_stale_temps(run_dir, recursive=True)


def to_cpu(obj):
    """``obj`` with every tensor in it (nested dicts, lists, tuples) detached and on the CPU, so a checkpoint
    written on a GPU loads with ``torch.load(weights_only=True)`` on a CPU-only machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError as e:  # another GPU count
            log.warning("CUDA RNG state not restored (%s)", e)


def weights_for_checkpoint(model: torch.nn.Module, config: ModelConfig) -> tuple[dict, ModelConfig]:
    """Plain cn_clip weights (LoRA merged) and the config to store with them."""
    m = unwrap(model)
    if has_lora(m):
        return merged_state_dict(m), ModelConfig.from_dict(
            {**config.to_dict(), "tuning": {**config.tuning, "merged": True}}
        )
    return m.state_dict(), config


class RunFiles:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.latest, self.best = self.run_dir / LATEST_CHECKPOINT, self.run_dir / BEST_CHECKPOINT
        self.ckpt_dir = self.latest.parent
        self.adapter_dir = self.run_dir / "adapters"
        self.best_hits = self.run_dir / "hits" / "best.hits.npy"
        self.metrics = self.run_dir / METRICS
        self.plot = self.run_dir / "curves.png"

    def epoch_path(self, epoch: int, step: int | None = None) -> Path:
        return self.ckpt_dir / (f"epoch_{epoch}.pt" if step is None else f"epoch_{epoch}_{step}.pt")

    def save(self, path: Path, model, config: ModelConfig, *, weights=None, **fields) -> None:
        """Checkpoint ``path`` (``weights``: :func:`weights_for_checkpoint`'s, when already made; ``fields``:
        epoch, step, name and any other key), and a LoRA model's adapters beside it."""
        sd, cfg = weights or weights_for_checkpoint(model, config)
        save_checkpoint(path, sd, cfg, **fields)
        if has_lora(unwrap(model)):
            adapter = {"adapter": to_cpu(adapter_state_dict(unwrap(model))), "lora": config.tuning.get("lora")}
            adapter.update(
                config=cfg.to_dict(), epoch=int(fields["epoch"]), step=int(fields["step"]), name=fields["name"]
            )
            with atomic_path(self.adapter_dir / path.name) as tmp:
                torch.save(adapter, tmp)

    def complete(self, path: Path, model) -> bool:
        """Whether checkpoint ``path`` (and, for a LoRA model, its adapter file) is on disk."""
        return path.is_file() and (not has_lora(unwrap(model)) or (self.adapter_dir / path.name).is_file())

    def log_row(self, row: dict) -> None:
        append_metric(self.metrics, row)

    def truncate_metrics(self, step: int, redo_validation: bool = False) -> None:
        """On resume at ``step``: drop the lines logged after it (a line torn by the kill goes too), and its
        validation lines where ``redo_validation``."""
        if self.metrics.is_file():
            rows = read_metrics(self.metrics)
            keep = [
                r
                for r in rows
                if r["step"] < step or (r["step"] == step and not (redo_validation and r["kind"] == "valid"))
            ]
            rewrite_metrics(self.metrics, keep)

    def draw_curves(self, title: str) -> None:
        """``curves.png`` from ``metrics.jsonl``; a failure is a warning (a plot never ends a run)."""
        try:
            plot_run(read_metrics(self.metrics), self.plot, title=title)
        except Exception as e:  # noqa: BLE001 - a plot must never kill a training run
            log.warning("could not draw %s: %s", self.plot, e)

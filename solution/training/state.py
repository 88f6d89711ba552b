"""A run folder: its lock, checkpoints (``epoch_latest.pt`` resumable; LoRA adapters in ``adapters/``), logs."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

from cn_clip_patch.tuning import adapter_state_dict, has_lora, merged_state_dict, unwrap
from solution.common import (
    SolutionError,
    atomic_path,
    check_output,
    disk_full_as_error,
    folder_lock,
    remove_stale_temps,
)
from solution.formats.kinds import claim_folder
from solution.formats.run_files import BEST_CHECKPOINT, LATEST_CHECKPOINT, METRICS, append_metric, read_metrics
from solution.model import ModelConfig, save_checkpoint
from solution.plots import plot_run, tensorboard

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
BOARD = {"train": ("loss", "lr", "logit_scale"), "valid": ("r1", "r5", "r10", "mean_recall", "val_loss")}


def claim_run_folder(stack: contextlib.ExitStack, run_dir: Path, logs: str | os.PathLike) -> None:
    """Lock and claim the run folder while ``stack`` lives (an flock: gone even on kill -9); drop stale temps."""
    check_output(logs, what="--logs", is_dir=True)
    check_output(run_dir, what="run folder", is_dir=True)
    try:
        with disk_full_as_error(run_dir / LOCK_NAME):
            stack.enter_context(folder_lock(run_dir / LOCK_NAME, f"run folder {run_dir}"))
    except PermissionError as e:
        raise SolutionError(f"cannot write in run folder {run_dir}: {e.strerror} ({e.filename})") from None
    claim_folder(run_dir, "run", "run folder")
    remove_stale_temps(run_dir, recursive=True)


def to_cpu(obj):
    """``obj`` with every tensor in it detached and on the CPU (a GPU run's checkpoint loads on a CPU)."""
    return tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, obj)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError as e:  # another GPU count
            log.warning("CUDA RNG state not restored (%s)", e)


def weights_for_checkpoint(model: torch.nn.Module, config: ModelConfig) -> tuple[dict, ModelConfig]:
    """Plain cn_clip weights (LoRA merged) and the config to store with them."""
    m = unwrap(model)
    if not has_lora(m):
        return m.state_dict(), config
    merged = ModelConfig.from_dict({**config.to_dict(), "tuning": {**config.tuning, "merged": True}})
    return merged_state_dict(m), merged


class RunFiles:
    def __init__(self, run_dir: str | Path, name: str = ""):
        self.run_dir, self.name = Path(run_dir), name  # the run's name (--name), stored in its checkpoints
        self.latest, self.best = self.run_dir / LATEST_CHECKPOINT, self.run_dir / BEST_CHECKPOINT
        self.adapter_dir = self.run_dir / "adapters"
        self.best_hits = self.run_dir / "hits" / "best.hits.npy"
        self.metrics = self.run_dir / METRICS
        self.board = None  # --report-to tensorboard: its SummaryWriter

    def epoch_path(self, epoch: int, step: int | None = None) -> Path:
        return self.latest.parent / (f"epoch_{epoch}.pt" if step is None else f"epoch_{epoch}_{step}.pt")

    def save(self, path: Path, model, config: ModelConfig, *, epoch: int, step: int, weights=None, **extra) -> None:
        """Checkpoint ``path`` (``weights`` when made already), and a LoRA model's adapters beside it."""
        sd, cfg = weights or weights_for_checkpoint(model, config)
        save_checkpoint(path, sd, cfg, epoch=epoch, step=step, name=self.name, **extra)
        if has_lora(unwrap(model)):
            adapter = {"adapter": to_cpu(adapter_state_dict(unwrap(model))), "lora": config.tuning.get("lora")}
            adapter.update(config=cfg.to_dict(), epoch=epoch, step=step, name=self.name)
            with atomic_path(self.adapter_dir / path.name) as tmp:
                torch.save(adapter, tmp)

    def log_row(self, row: dict, write: bool = True) -> None:
        """A ``metrics.jsonl`` line, its :data:`BOARD` values to TensorBoard (``train/KEY``, ``valid/SET/KEY``)."""
        if write:
            append_metric(self.metrics, row)
        tag = "train" if row["kind"] == "train" else f"valid/{row['set']}"
        for key in BOARD[row["kind"]] if self.board else ():
            if key in row:
                self.board.add_scalar(f"{tag}/{key}", row[key], row["step"])

    def open_board(self) -> None:
        """``--report-to tensorboard``: event files in ``tensorboard/``, written afresh."""
        shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
        self.board = tensorboard(self.run_dir / "tensorboard")

    def draw_curves(self, title: str) -> None:
        """``curves.png`` from ``metrics.jsonl``; a failure is a warning (a plot never ends a run)."""
        try:
            plot_run(read_metrics(self.metrics), self.run_dir / "curves.png", title=title)
        except Exception as e:  # noqa: BLE001 - a plot must never kill a training run
            log.warning("could not draw curves.png: %s", e)

"""The files of one training run directory: checkpoints, RNG state, params, the metrics log, the plot.

Layout of ``{logs}/{name}/``::

    checkpoints/epoch_{N}.pt        weights + config (LoRA: merged into plain cn_clip weights)
    checkpoints/epoch_{N}_{S}.pt    with --save-step-frequency (cn_clip's naming)
    checkpoints/epoch_latest.pt     the above + "optimizer" + "train_state" (resumable)
    checkpoints/best.pt             weights of the best validation (main set mean recall)
    adapters/{same stem}.pt         LoRA runs: the adapter tensors alone
    hits/best.hits.npy (+ .ids.npy) per-query hits of the best validation (:mod:`solution.formats.hits`)
    params.json                     the run's configuration (see :mod:`.run_config`)
    metrics.jsonl                   read and written through :mod:`solution.formats.run_files`
    curves.png

``train_state`` holds what an exact resume needs: data position ``{"epoch", "micro"}``
(next epoch index and micro-batch in it), RNG states, GradScaler state, best record, early-stop
counter and, for LoRA, the adapted (unmerged) state dict. Everything is plain tensors/containers,
so ``torch.load(weights_only=True)`` reads it.

Saving order: ``epoch_latest.pt`` first, recording in ``train_state["owed"]`` the checkpoint names
written right after it from the same weights (``epoch_{N}.pt`` ...), and in ``"closed"`` whether
the end-of-epoch/final work (validation, epoch checkpoint) is done. A run killed between the two
writes is resumed with those files still owed, and writes them before anything else; a run killed
before ``"closed"`` was recorded at an epoch end or at its last step redoes that work.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from cn_clip_patch.tuning import adapter_state_dict, has_lora, merged_state_dict, unwrap
from solution.common import atomic_path
from solution.formats.run_files import METRICS, PARAMS, append_metric, read_metrics, rewrite_metrics, write_params
from solution.model import ModelConfig, save_checkpoint
from solution.plots import plot_run

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- RNG


def to_cpu(obj):
    """``obj`` with every tensor in it (nested dicts, lists, tuples) detached and on the CPU, so a
    checkpoint written on a GPU loads with ``torch.load(weights_only=True)`` on a CPU-only machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [to_cpu(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError as e:  # another GPU count
            log.warning("CUDA RNG state not restored (%s)", e)


# ---------------------------------------------------------------- checkpoints


def weights_for_checkpoint(model: torch.nn.Module, config: ModelConfig) -> tuple[dict, ModelConfig]:
    """Plain cn_clip weights (LoRA merged) and the config to store with them."""
    m = unwrap(model)
    if has_lora(m):
        cfg = ModelConfig.from_dict({**config.to_dict(), "tuning": {**config.tuning, "merged": True}})
        return merged_state_dict(m), cfg
    return m.state_dict(), config


class RunFiles:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.adapter_dir = self.run_dir / "adapters"
        self.latest = self.ckpt_dir / "epoch_latest.pt"
        self.best = self.ckpt_dir / "best.pt"
        self.best_hits = self.run_dir / "hits" / "best.hits.npy"
        self.metrics = self.run_dir / METRICS
        self.params = self.run_dir / PARAMS
        self.plot = self.run_dir / "curves.png"

    def epoch_path(self, epoch: int, step: int | None = None) -> Path:
        return self.ckpt_dir / (f"epoch_{epoch}.pt" if step is None else f"epoch_{epoch}_{step}.pt")

    def save(
        self,
        path: Path,
        model,
        config: ModelConfig,
        *,
        epoch: int,
        step: int,
        name: str,
        weights: tuple[dict, ModelConfig] | None = None,
        **extra,
    ) -> Path:
        sd, cfg = weights or weights_for_checkpoint(model, config)
        save_checkpoint(path, sd, cfg, epoch=epoch, step=step, name=name, **extra)
        m = unwrap(model)
        if has_lora(m):
            adapter = {
                "adapter": to_cpu(adapter_state_dict(m)),
                "lora": config.tuning.get("lora"),
                "config": cfg.to_dict(),
                "epoch": int(epoch),
                "step": int(step),
                "name": name,
            }
            with atomic_path(self.adapter_dir / path.name) as tmp:
                torch.save(adapter, tmp)
        return path

    def complete(self, path: Path, model) -> bool:
        """Whether checkpoint ``path`` (and, for a LoRA model, its adapter file) is on disk."""
        return path.is_file() and (not has_lora(unwrap(model)) or (self.adapter_dir / path.name).is_file())

    def pay_owed(
        self, owed: list[str], model, config: ModelConfig, *, epoch: int, step: int, name: str, best: dict | None
    ) -> None:
        """On resume: write the checkpoints the resumed ``epoch_latest.pt`` owes (its run was killed right
        after writing it), and ``best.pt`` if it is missing while the best record is this very step."""
        for fname in owed:
            path = self.ckpt_dir / fname
            if not self.complete(path, model):
                self.save(path, model, config, epoch=epoch, step=step, name=name)
                log.info("wrote %s, owed by the interrupted run at step %d", path, step)
        if best and best.get("step") == step and not self.best.is_file():
            self.save(self.best, model, config, epoch=epoch, step=step, name=name, metrics=dict(best))
            log.info("wrote %s, owed by the interrupted run at step %d", self.best, step)

    # -------------------------------------------------- params.json, metrics.jsonl, curves.png

    def write_params(self, record: dict) -> None:
        write_params(self.run_dir, record)

    def log_row(self, row: dict) -> None:
        append_metric(self.metrics, row)

    def truncate_metrics(self, step: int, drop_valid_at_step: bool = False) -> None:
        """On resume: drop lines logged after the checkpoint we resume from (and its step's validation
        rows where that validation is to be redone); a last line torn by the kill goes too."""
        if not self.metrics.is_file():
            return
        keep = [
            row
            for row in read_metrics(self.metrics)
            if int(row.get("step", 0)) < step
            or (int(row.get("step", 0)) == step and not (drop_valid_at_step and row.get("kind") == "valid"))
        ]
        rewrite_metrics(self.metrics, keep)

    def draw_curves(self, title: str) -> None:
        """``curves.png`` from ``metrics.jsonl``; a failure is a warning (a plot never ends a run)."""
        try:
            plot_run(read_metrics(self.metrics), self.plot, title=title)
        except Exception as e:  # noqa: BLE001 - a plot must never kill a training run
            log.warning("could not draw %s: %s", self.plot, e)

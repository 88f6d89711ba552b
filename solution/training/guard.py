"""Run-folder safety for the trainer: where a run writes, one writer at a time, what a re-run may resume.

* ``--logs`` must be (or become) a folder, and ``{logs}/{name}`` a folder inside it (``--name`` is
  checked in :mod:`solution.training.flags`);
* the main process holds ``{run}/.train.lock`` for the whole run (an ``flock``: the kernel drops it
  when its holder dies, even by ``kill -9``); a second writer of the same run folder fails with one
  line naming the holder. Once the lock is taken, temporary files (``.NAME.*.tmp``) a killed writer
  left anywhere in the run folder are removed: no live writer owns them;
* re-running a run resumes its own ``epoch_latest.pt``. Where flags that change training differ
  from the run's ``params.json`` (:func:`training_flags`: data, model, prompt, tuning, batch x
  processes, accumulation, steps, optimiser and schedule, precision, loss options, seed, early
  stop), the re-run is refused, listing each ``flag old -> new``, unless ``--allow-changed-flags``
  (then the change is logged and kept in ``params.json["flag_changes"]``). Flags that only change
  logging, workers, device, the validation/save schedule or speed may change freely. The resolved
  values are compared (:func:`solution.training.run_config.resolved_params`), so a ``params.json``
  written before it recorded the typed flags is read the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch.distributed as dist

from solution.common import SolutionError, check_output, disk_full_as_error, folder_lock, remove_stale_temps
from solution.formats.run_files import PARAMS, read_params

from .run_config import resolved_params

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
STEPS = "max steps (--max-steps/--max-epochs)"
BATCH = "--batch-size x processes"
_PLAIN = (
    "train_data",
    "val_data",
    "extra_val_data",
    "augment",
    "vision_model",
    "text_model",
    "context_length",
    "text_prompt",
    "accum_freq",
    "lr",
    "beta1",
    "beta2",
    "eps",
    "wd",
    "warmup",
    "skip_scheduler",
    "precision",
    "same_text_positives",
    "skip_aggregate",
    "mask_ratio",
    "seed",
    "early_stop_patience",
    "use_bn_sync",
)
HARMLESS = (
    "log_interval",
    "num_workers",
    "valid_num_workers",
    "device",
    "valid_batch_size",
    "valid_step_interval",
    "valid_epoch_interval",
    "save_epoch_frequency",
    "save_step_frequency",
    "report_training_batch_acc",
    "grad_checkpointing",
    "attn_impl",
    "torchcompile",
    "torchcompile_backend",
    "no_plot",
    "no_progress",
    "debug",
)


def agree(d, fn: Callable[[], object], share: bool = False):
    """Run ``fn`` on the main process only; a :class:`SolutionError` it raises is raised on every process.
    With ``share``, its result is sent to every process and returned there too (else only on the main)."""
    err = out = None
    if d.main:
        try:
            out = fn()
        except SolutionError as e:
            err = str(e)
        except BaseException:
            if d.world > 1:  # the other processes must not wait for an answer that never comes
                dist.broadcast_object_list(["the main process failed (see its traceback)", None], src=0)
            raise
    if d.world > 1:
        box = [err, out if share else None]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
        if share:
            out = box[1]
    if err is not None:
        raise SolutionError(err)
    return out


def claim_run_folder(stack: contextlib.ExitStack, run_dir: Path, logs: str | os.PathLike) -> None:
    """Check where the run writes, lock its folder for this process (held until ``stack`` closes) and
    remove the temporary files a killed writer left in it."""
    check_output(logs, what="--logs", is_dir=True)
    check_output(run_dir, what="run folder", is_dir=True)
    try:
        with disk_full_as_error(run_dir / LOCK_NAME):
            stack.enter_context(folder_lock(run_dir / LOCK_NAME, f"run folder {run_dir}"))
    except PermissionError as e:
        raise SolutionError(f"cannot write in run folder {run_dir}: {e.strerror} ({e.filename})") from None
    remove_stale_temps(run_dir, recursive=True)


def training_flags(p: Mapping) -> dict[str, object]:
    """The values in a params dict (``params.json``) that change what a run trains, by flag."""
    out: dict[str, object] = {f"--{k.replace('_', '-')}": p[k] for k in _PLAIN if k in p}
    if "max_steps" in p:
        out[STEPS] = p["max_steps"]
    if "batch_size" in p:
        out[BATCH] = int(p["batch_size"]) * int(p.get("world_size") or 1)
    tuning = (p.get("model_config") or {}).get("tuning")
    if isinstance(tuning, dict):
        lora = tuning.get("lora") or {}
        out["--lora-rank"] = int(lora.get("rank", 0))
        if lora:
            out.update(
                {
                    "--lora-alpha": lora.get("alpha"),
                    "--lora-dropout": lora.get("dropout"),
                    "--lora-targets": lora.get("targets"),
                }
            )
        out["--freeze-vision"], out["--freeze-text"] = (
            bool(tuning.get("freeze_vision")),
            bool(tuning.get("freeze_text")),
        )
    return out


def _same_path(a, b) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def _equal(flag: str, old, new) -> bool:
    if old == new:
        return True
    if flag in ("--train-data", "--val-data"):
        return _same_path(old, new)
    if flag == "--extra-val-data" and isinstance(old, list) and isinstance(new, list):
        a, b = (dict(str(x).partition("=")[::2] for x in v) for v in (old, new))
        return a.keys() == b.keys() and all(_same_path(a[k], b[k]) for k in a)
    return False


def _show(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _saved_params(run_dir: Path) -> dict | None:
    try:
        saved = read_params(run_dir)
    except SolutionError as e:
        raise SolutionError(
            f"{e}; restore or remove it to resume this run, or pass --no-auto-resume to start it over"
        ) from None
    return None if saved is None else resolved_params(saved)


def check_resume_flags(run_dir: Path, params: Mapping, step: int, allow: bool) -> list[dict]:
    """Compare this command's resolved ``params`` with the run's ``params.json`` before resuming at ``step``.

    Refuses changed training flags unless ``allow``; returns the run's flag-change history, with
    this re-run's consented changes appended (``[]`` when there are none).
    """
    saved = _saved_params(run_dir)
    if saved is None:
        log.warning("%s is missing: cannot check that this command's flags match the run's", run_dir / PARAMS)
        return []
    old, new = training_flags(saved), training_flags(params)
    changed = {k: (old[k], new[k]) for k in old if k in new and not _equal(k, old[k], new[k])}
    free = [
        f"--{k.replace('_', '-')} {_show(saved[k])} -> {_show(params[k])}"
        for k in HARMLESS
        if k in saved and k in params and saved[k] != params[k]
    ]
    if free:
        log.info(
            "resuming under other logging/worker/device/schedule flags than %s (they do not change the training): %s",
            run_dir / PARAMS,
            "; ".join(free),
        )
    history = list(saved.get("flag_changes") or [])
    if changed:
        text = "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changed.items())
        if not allow:
            raise SolutionError(
                f"run folder {run_dir} was trained with other flags than this command's (its params.json): "
                f"{text}. Re-run with the run's flags, pass --allow-changed-flags to continue it from step {step} "
                "under the new ones, or use another --name (or --no-auto-resume to start it over); logging, "
                "worker, device, validation- and save-schedule flags may change freely"
            )
        log.warning("resuming %s at step %d under changed flags (--allow-changed-flags): %s", run_dir, step, text)
        history.append({"step": int(step), "changes": {k: [a, b] for k, (a, b) in changed.items()}})
    return history

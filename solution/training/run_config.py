"""A run's resolved configuration (:data:`TrainConfig`, frozen: every flag as the run uses it, inherited from the
starting checkpoint or cn_clip's defaults where not given, and the run's facts), ``params.json``, and which
changed flags a re-run may resume under."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from cn_clip_patch.prompt import PromptError, check_prompt
from cn_clip_patch.tuning import tuning_recipe
from solution.common import SolutionError
from solution.formats.run_files import PARAMS, read_params
from solution.model import ModelConfig, resolve_config

from .flags import FLAGS, FREE, TRAINS, FlagError, extra_val_sets
from .loaders import num_micro_batches
from .setup import Start

log = logging.getLogger(__name__)

DEFAULT_VISION, DEFAULT_TEXT, DEFAULT_CONTEXT = "ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 52
FALLBACK_OPTIM = {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
RUN_FACTS = ("model_config", "world_size", "global_batch_size", "steps_per_epoch", "resumed_from", "train_pairs")
TUNING = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "freeze_vision", "freeze_text")
STEPS, BATCH = "max steps (--max-steps/--max-epochs)", "--batch-size x processes"
TrainConfig = dataclasses.make_dataclass("TrainConfig", ["config", *FLAGS, *RUN_FACTS], frozen=True)


def steps_per_epoch(train_pairs: int, batch_size: int, world: int, accum_freq: int, train_data: str) -> int:
    if batch_size * world > train_pairs:
        raise SolutionError(
            f"batch size {batch_size} x {world} process(es) = {batch_size * world} is larger than "
            f"the {train_pairs} training pairs in {train_data}"
        )
    micro = num_micro_batches(train_pairs, batch_size * world)
    if micro < accum_freq:
        raise SolutionError(f"--accum-freq {accum_freq} needs {accum_freq} batches per step but an epoch has {micro}")
    return micro // accum_freq


def model_config(args: argparse.Namespace, start: Start) -> ModelConfig:
    """The model the run trains: flags first, then the starting checkpoint's."""
    recipe = tuning_recipe(**{k: vars(args)[k] for k in TUNING})
    vision, text = args.vision_model or DEFAULT_VISION, args.text_model or DEFAULT_TEXT
    if start.ckpt is not None:
        cfg = resolve_config(
            start.ckpt, vision_model=args.vision_model, text_model=args.text_model, source=start.source
        )
        vision, text = cfg.vision_model, cfg.text_model
    stored = (start.ckpt or {}).get("config") or {}
    context = args.context_length or int(stored.get("context_length", DEFAULT_CONTEXT))
    prompt = args.text_prompt if args.text_prompt is not None else str(stored.get("text_prompt", ""))
    config = ModelConfig(vision, text, context_length=context, text_prompt=prompt, tuning=recipe)
    positions = int(config.model_info.get("text_max_position_embeddings", 512))
    if context > positions:
        raise FlagError(
            "--context-length", f"--context-length {context} exceeds the text model's {positions} positions"
        )
    try:
        check_prompt(config.text_prompt, config.context_length)
    except PromptError as e:
        raise FlagError("--text-prompt", f"--text-prompt: {e}") from None
    return config


def resolve(args: argparse.Namespace, start: Start, *, world: int, train_pairs: int, device: str) -> TrainConfig:
    """The run's :data:`TrainConfig` from the typed flags (left unchanged), the start, the process count, the
    training split's size and the device."""
    from cn_clip.training.params import get_default_params

    model = model_config(args, start)
    values = dict(vars(args))
    optim = {**FALLBACK_OPTIM, **get_default_params(model.vision_model)}
    values.update({k: optim[k] for k in FALLBACK_OPTIM if values[k] is None})
    per_epoch = steps_per_epoch(train_pairs, args.batch_size, world, args.accum_freq, args.train_data)
    if args.max_steps is not None:
        values["max_epochs"] = -(-args.max_steps // per_epoch)
    else:
        values["max_steps"] = per_epoch * args.max_epochs
    lora = model.tuning.get("lora") or {}
    values.update({k: getattr(model, k) for k in ("vision_model", "text_model", "context_length", "text_prompt")})
    values.update(lora_alpha=lora.get("alpha", args.lora_alpha), lora_targets=lora.get("targets", args.lora_targets))
    values.update(extra_val_data=list(args.extra_val_data or ()), device=device, model_config=model)
    values.update(augment=args.augment or ("cnclip" if args.use_augment else "none"), resumed_from=start.source)
    global_batch = args.batch_size * world * args.accum_freq
    values.update(world_size=world, global_batch_size=global_batch, steps_per_epoch=per_epoch, train_pairs=train_pairs)
    return TrainConfig(**values)


def params_record(args: argparse.Namespace, cfg: TrainConfig, flag_changes: list | None = None) -> dict:
    """``params.json``: the resolved values by flag name, the run's facts, the consented flag changes of re-runs
    and the flags as typed (``typed``)."""
    record = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    record["model_config"] = cfg.model_config.to_dict()
    if flag_changes:
        record["flag_changes"] = list(flag_changes)
    return {**record, "typed": dict(vars(args))}


def training_flags(p: Mapping) -> dict[str, object]:
    """The values of a ``params.json`` whose change changes what a run trains, by how a refusal names them."""
    out = {FLAGS[k].name: FLAGS[k].parse(v) if isinstance(v, str) else v for k, v in p.items() if _compared(k)}
    if "max_steps" in p:
        out[STEPS] = p["max_steps"]
    if "batch_size" in p:
        out[BATCH] = int(p["batch_size"]) * int(p.get("world_size") or 1)
    return out


def _compared(key: str) -> bool:
    return key in FLAGS and FLAGS[key].resume == TRAINS and key not in ("max_steps", "batch_size")


def _same(flag: str, old, new) -> bool:
    """Whether two values of a flag are the same (data paths: the same folders, however spelled)."""

    def real(v):
        if flag == "--extra-val-data":
            return {name: os.path.realpath(path) for name, path in extra_val_sets(v).items()}
        return os.path.realpath(v) if v and flag in ("--train-data", "--val-data") else v

    return real(old) == real(new)


def _changes(pairs) -> str:
    return "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in pairs)


def check_resume_flags(run_dir: Path, params: Mapping, step: int, allow: bool) -> list[dict]:
    """Compare this command's ``params`` with the run's ``params.json`` before resuming at ``step``: refuse changed
    training flags unless ``allow``; return the flag-change history with this re-run's."""
    try:
        saved = read_params(run_dir)
    except SolutionError as e:
        raise SolutionError(f"{e}; restore or remove it to resume this run, or pass --no-auto-resume") from None
    if saved is None:
        log.warning("%s is missing: cannot check that this command's flags match the run's", run_dir / PARAMS)
        return []
    old, new = training_flags(saved), training_flags(params)
    changed = {k: (old[k], new[k]) for k in old if k in new and not _same(k, old[k], new[k])}
    free = [(f.name, (saved[k], params[k])) for k, f in FLAGS.items() if f.resume == FREE and k in saved]
    free = [(name, (a, b)) for name, (a, b) in free if a != b]
    if free:
        log.info("resuming under other flags that do not change the training than %s: %s", PARAMS, _changes(free))
    history = list(saved.get("flag_changes") or [])
    if changed and not allow:
        raise SolutionError(
            f"run folder {run_dir} was trained with other flags than this command's (its params.json): "
            f"{_changes(changed.items())}. Re-run with the run's flags, pass --allow-changed-flags to continue it from "
            f"step {step} under the new ones, or use another --name (or --no-auto-resume to start it over); logging, "
            "worker, device, validation- and save-schedule flags may change freely"
        )
    if changed:
        log.warning("resuming %s at step %d under changed flags: %s", run_dir, step, _changes(changed.items()))
        history.append({"step": int(step), "changes": {k: [a, b] for k, (a, b) in changed.items()}})
    return history

"""The resolved configuration of one training run: :class:`TrainConfig`, built once, never changed.

The command line (:mod:`.config`) gives the flags as typed, where ``None`` means "inherit or
derive". :func:`resolve` turns them, with the starting checkpoint, the training split's size and
the process group, into a frozen :class:`TrainConfig` in which every value is the one the run uses:

- model: architecture, context length and prompt from the flags, else the starting checkpoint
  (else ViT-B-16 / RoBERTa-wwm-ext-base-chinese, 52 tokens, no prompt); the tuning recipe;
- optimiser: ``--lr``/``--beta1``/``--beta2``/``--eps`` from cn_clip's per-vision-model defaults
  where not given; ``--augment`` from ``--use-augment`` where not given; LoRA alpha and targets;
- length: ``--max-steps`` wins over ``--max-epochs``; the other one follows from the steps per epoch;
- the run's facts: processes, global batch, steps per epoch, training pairs, starting checkpoint.

``params.json`` (:func:`params_record`) holds the resolved values under the flag names it has
always used (one key per flag, plus ``model_config``, ``world_size``, ``global_batch_size``,
``steps_per_epoch``, ``resumed_from``, ``train_pairs``, and ``flag_changes`` after a consented
change), and the flags as typed under ``"typed"``. :func:`resolved_params` reads either layout
(files written before ``"typed"`` existed hold the resolved values only).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cn_clip_patch.prompt import PromptError, check_prompt
from cn_clip_patch.tuning import DEFAULT_LORA_TARGETS, tuning_recipe
from solution.common import SolutionError
from solution.model import ModelConfig, resolve_config

from .flags import extra_val_sets
from .loaders import num_micro_batches

if TYPE_CHECKING:
    from .setup import Start

DEFAULT_VISION, DEFAULT_TEXT, DEFAULT_CONTEXT = "ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 52
FALLBACK_OPTIM = {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
TYPED = "typed"
RUN_FACTS = ("model_config", "world_size", "global_batch_size", "steps_per_epoch", "resumed_from", "train_pairs")


@dataclass(frozen=True)
class TrainConfig:
    """Every trainer flag, resolved (same names as the flags), and the run's facts."""

    # data
    config: str | None
    train_data: str
    val_data: str | None
    extra_val_data: tuple[str, ...]
    num_workers: int
    valid_num_workers: int
    use_augment: bool
    augment: str
    context_length: int
    text_prompt: str
    # output
    logs: str
    name: str
    log_interval: int
    report_training_batch_acc: bool
    save_epoch_frequency: int
    save_step_frequency: int
    no_plot: bool
    no_progress: bool
    # model
    vision_model: str
    text_model: str
    resume: str | None
    no_auto_resume: bool
    allow_changed_flags: bool
    reset_optimizer: bool
    reset_data_offset: bool
    clip_weight_path: str | None
    bert_weight_path: str | None
    mask_ratio: float
    grad_checkpointing: bool
    use_flash_attention: bool
    attn_impl: str
    use_bn_sync: bool
    torchcompile: bool
    torchcompile_backend: str
    # tuning
    freeze_vision: bool
    freeze_text: bool
    lora_rank: int
    lora_alpha: float | None
    lora_dropout: float
    lora_targets: str | None
    # optimisation
    batch_size: int
    valid_batch_size: int
    max_steps: int
    max_epochs: int
    valid_step_interval: int | None
    valid_epoch_interval: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    wd: float
    warmup: int
    skip_scheduler: bool
    accum_freq: int
    precision: str
    same_text_positives: bool
    early_stop_patience: int | None
    seed: int
    device: str
    # accepted for compatibility with cn_clip
    gather_with_grad: bool
    skip_aggregate: bool
    debug: bool
    distillation: bool
    teacher_model_name: str | None
    kd_loss_weight: float
    # the run
    model_config: ModelConfig
    world_size: int
    global_batch_size: int  # pairs per optimizer step: batch size x processes x accumulation
    steps_per_epoch: int
    resumed_from: str | None
    train_pairs: int

    @property
    def extra_val(self) -> dict[str, str]:
        """``--extra-val-data`` as ``{name: LMDB path}``."""
        return extra_val_sets(self.extra_val_data)

    def to_dict(self) -> dict:
        """Plain JSON values under the flag names (``model_config`` as its dict, tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["extra_val_data"] = list(self.extra_val_data)
        out["model_config"] = self.model_config.to_dict()
        return out


def steps_per_epoch(train_pairs: int, batch_size: int, world: int, accum_freq: int, train_data: str) -> int:
    """Optimizer steps in one epoch; one clear error where the data cannot fill a step."""
    global_batch = batch_size * world
    if global_batch > train_pairs:
        raise SolutionError(
            f"batch size {batch_size} x {world} process(es) = {global_batch} is larger than "
            f"the {train_pairs} training pairs in {train_data}"
        )
    micro = num_micro_batches(train_pairs, global_batch)
    if micro // accum_freq == 0:
        raise SolutionError(
            f"--accum-freq {accum_freq} needs {accum_freq} batches per step but an epoch has only {micro}"
        )
    return micro // accum_freq


def optim_defaults(vision_model: str) -> dict[str, float]:
    """cn_clip's lr/beta1/beta2/eps for a vision model (a fallback for models it does not know)."""
    from cn_clip.training.params import get_default_params

    return {**FALLBACK_OPTIM, **get_default_params(vision_model)}


def model_config(args: argparse.Namespace, start: Start) -> ModelConfig:
    """The model the run trains: architecture, context length and prompt from the flags, else from
    the starting checkpoint; the tuning recipe of the flags. Checked against the text model."""
    recipe = tuning_recipe(
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets or DEFAULT_LORA_TARGETS,
        freeze_vision=args.freeze_vision,
        freeze_text=args.freeze_text,
    )
    if start.ckpt is not None:
        cfg = resolve_config(
            start.ckpt, vision_model=args.vision_model, text_model=args.text_model, source=start.source
        )
        vision, text = cfg.vision_model, cfg.text_model
    else:
        vision, text = args.vision_model or DEFAULT_VISION, args.text_model or DEFAULT_TEXT
    # Prompt and context length follow the starting checkpoint unless given: stages never disagree.
    stored = (start.ckpt or {}).get("config") or {}
    context = (
        args.context_length if args.context_length is not None else int(stored.get("context_length", DEFAULT_CONTEXT))
    )
    prompt = args.text_prompt if args.text_prompt is not None else str(stored.get("text_prompt", ""))
    config = ModelConfig(vision, text, context_length=context, text_prompt=prompt, tuning=recipe)
    positions = int(config.model_info.get("text_max_position_embeddings", 512))
    if context > positions:
        raise SolutionError(f"--context-length {context} exceeds the text model's {positions} positions")
    try:
        check_prompt(config.text_prompt, config.context_length)
    except PromptError as e:
        raise SolutionError(f"--text-prompt: {e}") from None
    return config


def resolve(args: argparse.Namespace, start: Start, *, world: int, train_pairs: int, device: str) -> TrainConfig:
    """The run's :class:`TrainConfig` from the typed flags ``args`` (left unchanged), the starting
    checkpoint, the process count, the training split's size and the device the run uses."""
    model = model_config(args, start)
    values = dict(vars(args))
    optim = optim_defaults(model.vision_model)
    values.update({k: optim[k] for k in ("lr", "beta1", "beta2", "eps") if values[k] is None})
    per_epoch = steps_per_epoch(train_pairs, args.batch_size, world, args.accum_freq, args.train_data)
    if args.max_steps is not None:
        values["max_epochs"] = -(-args.max_steps // per_epoch)
    else:
        values["max_steps"] = per_epoch * args.max_epochs
    lora = model.tuning.get("lora") or {}
    values.update(
        extra_val_data=tuple(args.extra_val_data or ()),
        augment=args.augment or ("cnclip" if args.use_augment else "none"),
        vision_model=model.vision_model,
        text_model=model.text_model,
        context_length=model.context_length,
        text_prompt=model.text_prompt,
        lora_alpha=lora.get("alpha", args.lora_alpha),
        lora_targets=lora.get("targets", args.lora_targets),
        device=device,
        model_config=model,
        world_size=world,
        global_batch_size=args.batch_size * world * args.accum_freq,
        steps_per_epoch=per_epoch,
        resumed_from=start.source,
        train_pairs=train_pairs,
    )
    return TrainConfig(**values)


def params_record(typed: argparse.Namespace, cfg: TrainConfig, flag_changes: list | None = None) -> dict:
    """What ``params.json`` holds: the resolved values by flag name, the flags as typed under
    ``"typed"``, and the consented flag changes of earlier re-runs (if any)."""
    record = cfg.to_dict()
    if flag_changes:
        record["flag_changes"] = list(flag_changes)
    record[TYPED] = dict(vars(typed))
    return record


def resolved_params(saved: Mapping) -> dict:
    """The resolved values of a ``params.json`` of either layout (with or without ``"typed"``)."""
    return {k: v for k, v in saved.items() if k != TYPED}

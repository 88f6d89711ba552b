"""Setting a run up: processes/devices, the starting checkpoint, the model with its tuning, the optimizer.

Where a run starts from (first match wins):

1. the run's own ``checkpoints/epoch_latest.pt`` (unless ``--no-auto-resume``): an exact resume
   (weights, optimizer, scaler, RNG, data position), so re-running a killed command continues it;
2. ``--resume FILE``: an official Chinese-CLIP file (``{"epoch", "step", "name", "state_dict"}``,
   ``module.`` keys, possibly fp16), a cn_clip training checkpoint (+ ``optimizer``) or one of ours.
   As in cn_clip, its epoch/step become the data offset unless ``--reset-data-offset``, and its
   optimizer state is restored unless ``--reset-optimizer`` (or absent/incompatible, with a warning);
3. random initialisation (``--seed``), optionally with cn_clip's ``--clip-weight-path`` /
   ``--bert-weight-path`` tower weights.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cn_clip_patch.prompt import PromptError, check_prompt
from cn_clip_patch.tuning import (DEFAULT_LORA_TARGETS, apply_tuning, set_grad_checkpointing, trainable_summary,
                                  tuning_recipe)

from solution.common import SolutionError, resolve_device
from .config import default_optim
from solution.model.models import ModelConfig, build_model, load_weights, read_checkpoint, resolve_config

log = logging.getLogger(__name__)

DEFAULT_VISION, DEFAULT_TEXT = "ViT-B-16", "RoBERTa-wwm-ext-base-chinese"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_flag: str) -> Dist:
    """One process, or torchrun's (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return Dist(device=resolve_device(device_flag))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        # validation runs on rank 0 while the others wait: allow long validations (default 2 h)
        timeout = datetime.timedelta(minutes=float(os.environ.get("SOLUTION_DIST_TIMEOUT_MIN", "120")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


@dataclass
class Start:
    """What the run starts from."""

    ckpt: dict | None = None
    source: str | None = None
    own: bool = False  # the run's own epoch_latest.pt: exact resume


def find_start(args, latest: Path) -> Start:
    if latest.is_file() and not args.no_auto_resume:
        log.info("resuming this run from %s", latest)
        return Start(read_checkpoint(latest), str(latest), True)
    if args.resume:
        if not Path(args.resume).is_file():
            raise SolutionError(f"--resume: checkpoint not found: {args.resume}")
        log.info("starting from %s", args.resume)
        return Start(read_checkpoint(args.resume), str(args.resume), False)
    return Start()


def model_config(args, start: Start) -> ModelConfig:
    recipe = tuning_recipe(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                           lora_targets=args.lora_targets or DEFAULT_LORA_TARGETS, freeze_vision=args.freeze_vision,
                           freeze_text=args.freeze_text)
    if start.ckpt is not None:
        cfg = resolve_config(start.ckpt, vision_model=args.vision_model, text_model=args.text_model, source=start.source)
        vision, text = cfg.vision_model, cfg.text_model
    else:
        vision, text = args.vision_model or DEFAULT_VISION, args.text_model or DEFAULT_TEXT
    # Prompt and context length follow the starting checkpoint unless given: stages never disagree.
    stored = (start.ckpt or {}).get("config") or {}
    if args.context_length is None:
        args.context_length = int(stored.get("context_length", 52))
    if args.text_prompt is None:
        args.text_prompt = str(stored.get("text_prompt", ""))
    config = ModelConfig(vision, text, context_length=args.context_length, text_prompt=args.text_prompt,
                         tuning=recipe)
    if args.context_length > int(config.model_info.get("text_max_position_embeddings", 512)):
        raise SolutionError(f"--context-length {args.context_length} exceeds the text model's "
                            f"{config.model_info['text_max_position_embeddings']} positions")
    try:
        check_prompt(config.text_prompt, config.context_length)
    except PromptError as e:
        raise SolutionError(f"--text-prompt: {e}") from None
    args.vision_model, args.text_model = vision, text
    default_optim(args)
    return config


def _tower_weights(path: str | None, what: str) -> dict | None:
    if not path:
        return None
    return read_checkpoint(path)["state_dict"]


def build(args, config: ModelConfig, start: Start) -> nn.Module:
    """The model on the CPU: weights loaded, tuning applied (LoRA injected, towers frozen)."""
    torch.manual_seed(args.seed)
    model = build_model(config, "cpu")
    if args.clip_weight_path or args.bert_weight_path:
        from cn_clip.clip.model import restore_model

        restore_model(model, _tower_weights(args.clip_weight_path, "--clip-weight-path"),
                      _tower_weights(args.bert_weight_path, "--bert-weight-path"), False)
        model.float()
    adapted = start.own and start.ckpt.get("train_state", {}).get("adapted_state_dict")
    if start.ckpt is not None and not adapted:
        load_weights(model, start.ckpt["state_dict"], config, start.source)
    apply_tuning(model, config.tuning)
    if adapted:
        own = model.state_dict()
        missing = [k for k in own if k not in adapted]
        unexpected = [k for k in adapted if k not in own]
        shapes = [k for k in own if k in adapted and tuple(adapted[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            example = (shapes or missing or unexpected)[0]
            raise SolutionError(f"{start.source}: its LoRA state does not fit this command's model {config.arch} and "
                                f"--lora-* flags ({len(shapes)} tensors of another shape, {len(missing)} missing, "
                                f"{len(unexpected)} unexpected; e.g. {example})")
        model.load_state_dict(adapted)
    if args.grad_checkpointing:
        set_grad_checkpointing(model, True)
    trainable, total = trainable_summary(model)
    if trainable == 0:
        raise SolutionError("nothing to train: every parameter is frozen (check --freeze-vision/--freeze-text)")
    log.info("model %s, tuning %s: %d of %d parameters trainable (%.2f%%)", config.arch, config.tuning["mode"],
             trainable, total, 100.0 * trainable / total)
    return model


def _no_decay(model: nn.Module) -> set[str]:
    """Biases, every normalisation layer's parameters, logit_scale (and other 0/1-D gains)."""
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
    out = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, norm_types) or pname.endswith("bias") or "logit_scale" in full or p.ndim < 2 \
                    or "LayerNorm" in full:
                out.add(full)
    return out


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW, cn_clip's two groups: no weight decay on biases, norms and logit_scale."""
    no_decay = _no_decay(model)
    plain, decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (plain if n in no_decay else decay).append(p)
    return torch.optim.AdamW([{"params": plain, "weight_decay": 0.0}, {"params": decay, "weight_decay": args.wd}],
                             lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> str | None:
    """Load a saved optimizer state; on a mismatch, leave the optimizer fresh and say why (else None).

    ``Optimizer.load_state_dict`` checks the parameter counts only: the shapes of the moments are
    checked here, so a state of another model fails now rather than at the first step.
    """
    fresh = optimizer.state_dict()
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        optimizer.load_state_dict(fresh)
        return str(e)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.ndim > 0 and tuple(v.shape) != tuple(p.shape):
                    optimizer.load_state_dict(fresh)
                    return f"its {name} of shape {tuple(v.shape)} belongs to a parameter of another shape {tuple(p.shape)}"
    return None


def make_scheduler(optimizer, args, total_steps: int):
    """cn_clip's warmup + cosine (its own function), or a constant rate with --skip-scheduler."""
    if args.skip_scheduler:
        def constant(step):
            for g in optimizer.param_groups:
                g["lr"] = args.lr
            return args.lr
        return constant
    from cn_clip.training.scheduler import cosine_lr

    warmup = args.warmup
    if warmup >= total_steps:
        log.warning("--warmup %d >= %d training steps: the learning rate never reaches its cosine phase", warmup, total_steps)
    adjust = cosine_lr(optimizer, args.lr, max(warmup, 0), total_steps)

    def cosine(step):
        lr = float(adjust(step))  # upstream computes a numpy float: keep checkpoints plain
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr
    return cosine


def make_scaler(args, device: torch.device):
    if args.precision in ("amp", "fp16") and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    if args.precision in ("amp", "fp16"):
        log.info("precision %s on %s: no float16 autocast there, training in fp32", args.precision, device.type)
    return None


def wrap(model: nn.Module, d: Dist, args) -> nn.Module:
    model = model.to(d.device)
    if d.world > 1:
        if args.use_bn_sync:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model

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

from cn_clip_patch.tuning import apply_tuning, trainable_summary
from solution.common import SolutionError, resolve_device
from solution.model import ModelConfig, build_model, load_weights, read_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    cpu_group: object = None  # a gloo group for small CPU-side agreements (None: the default group is gloo)

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
        device = rank_device(device, local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        # validation runs on rank 0 while the others wait: allow long validations (default 2 h)
        timeout = datetime.timedelta(minutes=float(os.environ.get("SOLUTION_DIST_TIMEOUT_MIN", "120")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        owns = True
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, owns, cpu_group)


def rank_device(device: torch.device, local_rank: int, cuda_count: int) -> torch.device:
    """This process's GPU under torchrun: the one of its ``LOCAL_RANK`` (an index in ``--device cuda:N``
    is not used there: it would put every process on GPU N; choose GPUs with ``CUDA_VISIBLE_DEVICES``)."""
    if device.index is not None and device.index != local_rank:
        log.warning(
            "--device %s under torchrun: process %d uses cuda:%d (its LOCAL_RANK); choose the GPUs with "
            "CUDA_VISIBLE_DEVICES",
            device,
            local_rank,
            local_rank,
        )
    if local_rank >= cuda_count:
        raise SolutionError(
            f"LOCAL_RANK {local_rank} but only {cuda_count} CUDA devices are visible: start at most "
            f"{cuda_count} processes per node"
        )
    return torch.device("cuda", local_rank)


def seed_process(seed: int, rank: int) -> None:
    """Seed this process's generators for dropout and ``--mask-ratio`` masks: ``seed + rank``, so the
    processes of one run draw different masks (the weights are built from ``seed`` alone, before)."""
    torch.manual_seed(int(seed) + int(rank))


@dataclass
class Start:
    """What the run starts from."""

    ckpt: dict | None = None
    source: str | None = None
    own: bool = False  # the run's own epoch_latest.pt: exact resume


def find_start(latest: Path, resume: str | None, auto_resume: bool = True, own: bool | None = None) -> Start:
    """The run's own ``latest`` checkpoint (when ``auto_resume``), else ``--resume``, else nothing.
    ``own``: whether to resume ``latest``, decided already (by the main process, for all of them)."""
    if own is None:
        own = latest.is_file() and auto_resume
    if own:
        log.info("resuming this run from %s", latest)
        return Start(read_checkpoint(latest), str(latest), True)
    if resume:
        if not Path(resume).is_file():
            raise SolutionError(f"--resume: checkpoint not found: {resume}")
        log.info("starting from %s", resume)
        return Start(read_checkpoint(resume), str(resume), False)
    return Start()


def _tower_weights(path: str | None) -> dict | None:
    return read_checkpoint(path)["state_dict"] if path else None


def build(
    config: ModelConfig,
    start: Start,
    *,
    seed: int,
    clip_weight_path: str | None = None,
    bert_weight_path: str | None = None,
    attn_impl: str = "sdpa",
) -> nn.Module:
    """The model on the CPU: weights loaded, tuning applied (LoRA injected, towers frozen), text
    attention on ``attn_impl``."""
    torch.manual_seed(seed)
    model = build_model(config, "cpu", attn_impl=attn_impl)
    if clip_weight_path or bert_weight_path:
        from cn_clip.clip.model import restore_model

        restore_model(model, _tower_weights(clip_weight_path), _tower_weights(bert_weight_path), False)
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
            raise SolutionError(
                f"{start.source}: its LoRA state does not fit this command's model {config.arch} and "
                f"--lora-* flags ({len(shapes)} tensors of another shape, {len(missing)} missing, "
                f"{len(unexpected)} unexpected; e.g. {example})"
            )
        model.load_state_dict(adapted)
    trainable, total = trainable_summary(model)
    if trainable == 0:
        raise SolutionError("nothing to train: every parameter is frozen (check --freeze-vision/--freeze-text)")
    log.info(
        "model %s, tuning %s: %d of %d parameters trainable (%.2f%%)",
        config.arch,
        config.tuning["mode"],
        trainable,
        total,
        100.0 * trainable / total,
    )
    return model


def _no_decay(model: nn.Module) -> set[str]:
    """Biases, every normalisation layer's parameters, logit_scale (and other 0/1-D gains)."""
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
    out = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if (
                isinstance(mod, norm_types)
                or pname.endswith("bias")
                or "logit_scale" in full
                or p.ndim < 2
                or "LayerNorm" in full
            ):
                out.add(full)
    return out


def make_optimizer(
    model: nn.Module, *, lr: float, betas: tuple[float, float], eps: float, wd: float
) -> torch.optim.Optimizer:
    """AdamW, cn_clip's two groups: no weight decay on biases, norms and logit_scale; the fused
    kernel when the parameters are on a GPU (the same update, one launch), the usual one elsewhere."""
    no_decay = _no_decay(model)
    plain, decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (plain if n in no_decay else decay).append(p)
    fused = {"fused": True} if all(p.is_cuda for p in plain + decay) and plain + decay else {}
    return torch.optim.AdamW(
        [{"params": plain, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}],
        lr=lr,
        betas=betas,
        eps=eps,
        **fused,
    )


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
                    return (
                        f"its {name} of shape {tuple(v.shape)} belongs to a parameter of another shape {tuple(p.shape)}"
                    )
    return None


def make_scheduler(optimizer, *, lr: float, warmup: int, total_steps: int, constant: bool = False):
    """cn_clip's warmup + cosine (its own function), or a constant rate (``--skip-scheduler``)."""
    if constant:

        def fixed(step):
            for g in optimizer.param_groups:
                g["lr"] = lr
            return lr

        return fixed
    from cn_clip.training.scheduler import cosine_lr

    if warmup >= total_steps:
        log.warning(
            "--warmup %d >= %d training steps: the learning rate never reaches its cosine phase", warmup, total_steps
        )
    adjust = cosine_lr(optimizer, lr, max(warmup, 0), total_steps)

    def cosine(step):
        lr = float(adjust(step))  # upstream computes a numpy float: keep checkpoints plain
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    return cosine


def make_scaler(precision: str, device: torch.device):
    """A GradScaler for float16 autocast on CUDA, else None."""
    if precision in ("amp", "fp16") and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    if precision in ("amp", "fp16"):
        log.info("precision %s on %s: no float16 autocast there, training in fp32", precision, device.type)
    return None


def wrap(model: nn.Module, d: Dist, use_bn_sync: bool = False) -> nn.Module:
    """The model on this process's device; under DDP when there are several processes."""
    model = model.to(d.device)
    if d.world > 1:
        if use_bn_sync:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    return model

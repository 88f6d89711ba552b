"""Setting a run up: processes and devices, the starting checkpoint (the run's own ``epoch_latest.pt``, else
``--resume``: official, cn_clip's or ours, else random weights), the model with its tuning, the optimizer."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
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


def init_distributed(device_flag: str, timeout_min: float, env: dict[str, str]) -> Dist:
    """One process, or torchrun's (``env``: its ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): NCCL on GPU, gloo on
    CPU; ``timeout_min``: how long the other processes wait for the main one's validation."""
    device = resolve_device(device_flag)
    if int(env.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return Dist(device=device)
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = rank_device(device, local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, owns, cpu_group)


def rank_device(device: torch.device, local_rank: int, cuda_count: int) -> torch.device:
    """This process's GPU under torchrun: the one of its ``LOCAL_RANK`` (not ``--device cuda:N``'s N, which
    would put every process on one GPU: choose GPUs with ``CUDA_VISIBLE_DEVICES``)."""
    if device.index is not None and device.index != local_rank:
        log.warning("--device %s under torchrun: process %d uses cuda:%d", device, local_rank, local_rank)
    if local_rank >= cuda_count:
        raise SolutionError(
            f"LOCAL_RANK {local_rank} but only {cuda_count} CUDA devices are visible: start at most "
            f"{cuda_count} processes per node"
        )
    return torch.device("cuda", local_rank)


def on_main(d: Dist, fn: Callable[[], object], share: bool = False):
    """``fn()`` on the main process only; a :class:`SolutionError` it raises is raised on every process, and
    with ``share`` its result is returned on every process (else on the main one only)."""
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
        err, out = box[0], box[1] if share else out
    if err is not None:
        raise SolutionError(err)
    return out


def seed_process(seed: int, rank: int) -> None:
    """Seed dropout and ``--mask-ratio`` draws with ``seed + rank`` (the weights were built from ``seed``)."""
    torch.manual_seed(int(seed) + int(rank))


@dataclass
class Start:
    """What the run starts from."""

    ckpt: dict | None = None
    source: str | None = None
    is_own_run: bool = False  # the run's own epoch_latest.pt: an exact resume


def find_start(latest: Path, resume: str | None, is_own_run: bool) -> Start:
    """The run's own ``latest`` checkpoint when ``is_own_run`` (decided by the main process), else ``--resume``."""
    if is_own_run:
        log.info("resuming this run from %s", latest)
        return Start(read_checkpoint(latest), str(latest), True)
    if resume:
        if not Path(resume).is_file():
            raise SolutionError(f"--resume: checkpoint not found: {resume}")
        log.info("starting from %s", resume)
        return Start(read_checkpoint(resume), str(resume), False)
    return Start()


def build(config: ModelConfig, start: Start, *, seed: int, tower_weights=(None, None), attn_impl="sdpa") -> nn.Module:
    """The model on the CPU: weights loaded (``tower_weights``: cn_clip's CLIP and BERT weight files), tuning
    applied, text attention on ``attn_impl``."""
    torch.manual_seed(seed)
    model = build_model(config, "cpu", attn_impl=attn_impl)
    if any(tower_weights):
        from cn_clip.clip.model import restore_model

        restore_model(model, *(read_checkpoint(p)["state_dict"] if p else None for p in tower_weights), False)
        model.float()
    adapted = start.is_own_run and start.ckpt.get("train_state", {}).get("adapted_state_dict")
    if start.ckpt is not None and not adapted:
        load_weights(model, start.ckpt["state_dict"], config, start.source)
    apply_tuning(model, config.tuning)
    if adapted:
        try:
            model.load_state_dict(adapted)
        except RuntimeError as e:  # torch names the first misfit on its second line
            misfit = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:200]
            raise SolutionError(
                f"{start.source}: its LoRA state does not fit this command's model {config.arch} and --lora-* flags "
                f"({misfit})"
            ) from None
    trainable, total = trainable_summary(model)
    if trainable == 0:
        raise SolutionError("nothing to train: every parameter is frozen (check --freeze-vision/--freeze-text)")
    log.info("model %s, tuning %s: %d of %d parameters trainable", config.arch, config.tuning["mode"], trainable, total)
    return model


def make_optimizer(model: nn.Module, *, lr: float, betas, eps: float, wd: float) -> torch.optim.Optimizer:
    """AdamW in cn_clip's two groups: no weight decay on biases, norms, logit_scale and other 0/1-D gains;
    fused where every parameter is on a GPU."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
    in_norms = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    plain, decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            gain = id(p) in in_norms or name.endswith("bias") or p.ndim < 2 or "LayerNorm" in name
            (plain if gain or "logit_scale" in name else decay).append(p)
    fused = {"fused": True} if plain + decay and all(p.is_cuda for p in plain + decay) else {}
    groups = [{"params": plain, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> str | None:
    """Load a saved optimizer state; on a mismatch leave the optimizer fresh and say why (else None).
    ``load_state_dict`` checks parameter counts only: the moments' shapes are checked here."""
    fresh = optimizer.state_dict()
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        optimizer.load_state_dict(fresh)
        return str(e)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.ndim > 0 and v.shape != p.shape:
                    optimizer.load_state_dict(fresh)
                    return f"its {name} of shape {tuple(v.shape)} belongs to a parameter of shape {tuple(p.shape)}"
    return None


def make_scheduler(optimizer, lr: float, warmup: int, total_steps: int, constant: bool = False):
    """cn_clip's warmup + cosine (its own function), or a constant rate (``--skip-scheduler``)."""
    from cn_clip.training.scheduler import cosine_lr

    if warmup >= total_steps and not constant:
        log.warning(
            "--warmup %d >= %d training steps: the learning rate never reaches its cosine phase", warmup, total_steps
        )
    adjust = cosine_lr(optimizer, lr, max(warmup, 0), total_steps)

    def schedule(step: int) -> float:
        rate = lr if constant else float(adjust(step))  # upstream computes a numpy float: keep checkpoints plain
        for g in optimizer.param_groups:
            g["lr"] = rate
        return rate

    return schedule


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

"""Setting a run up: processes and devices, the starting checkpoint, the model, the optimizer and its schedule."""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cn_clip_patch.tuning import apply_tuning, trainable_summary, unwrap
from solution.common import SolutionError, resolve_device
from solution.model import build_model, load_weights, read_checkpoint
from solution.model.compiled import blocks

log = logging.getLogger(__name__)
TOP = re.compile(r"(ln_post|proj|attnpool)\b")  # a tower's parameters above its blocks


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    cpu_group: object = None  # a gloo group for small CPU-side agreements (None: the default group is gloo)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_flag: str, timeout_min: float, env: dict[str, str]) -> Dist:
    """One process, or torchrun's (``env``: its ``WORLD_SIZE``, ``LOCAL_RANK``): NCCL on GPU, gloo on CPU."""
    device = resolve_device(device_flag)
    if int(env.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return Dist(device=device)
    if device.type == "cuda":
        device = rank_device(device, int(env.get("LOCAL_RANK", "0")), torch.cuda.device_count())
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Dist(dist.get_rank(), dist.get_world_size(), device, owns, cpu_group)


def rank_device(device: torch.device, local_rank: int, cuda_count: int) -> torch.device:
    """The GPU of ``LOCAL_RANK`` (``--device cuda:N`` would put every process on one GPU)."""
    if device.index is not None and device.index != local_rank:
        log.warning("--device %s under torchrun: process %d uses cuda:%d", device, local_rank, local_rank)
    if local_rank >= cuda_count:
        raise SolutionError(f"LOCAL_RANK {local_rank} but only {cuda_count} CUDA devices are visible: start fewer")
    return torch.device("cuda", local_rank)


def on_main(d: Dist, fn: Callable[[], object]):
    """``fn()`` on the main process, its result (or its :class:`SolutionError`) on every process."""
    err = out = None
    if d.main:
        try:
            out = fn()
        except SolutionError as e:
            err = str(e)
        except BaseException as e:
            if d.world > 1:  # the other processes must not wait for an answer that never comes
                dist.broadcast_object_list([f"stopped: the main process raised {type(e).__name__}: {e}", None], src=0)
            raise
    if d.world > 1:
        box = [err, out]
        dist.broadcast_object_list(box, src=0)
        err, out = box
    if err is not None:
        raise SolutionError(err)
    return out


@dataclass
class Start:
    ckpt: dict | None = None
    source: str | None = None
    is_own_run: bool = False  # the run's own epoch_latest.pt: an exact resume


def find_start(latest: Path, resume: str | None, is_own_run: bool) -> Start:
    """The run's own ``latest`` checkpoint when ``is_own_run`` (decided by the main process), else ``--resume``."""
    path = latest if is_own_run else resume
    if path and not Path(path).is_file():
        raise SolutionError(f"--resume: checkpoint not found: {resume}")
    if path:
        log.info("%s %s", "resuming this run from" if is_own_run else "starting from", path)
    return Start(read_checkpoint(path), str(path), is_own_run) if path else Start()


def build(cfg, start: Start) -> nn.Module:
    """The run's model on the CPU: weights loaded (or cn_clip's ``--clip/bert-weight-path``), tuning applied."""
    config, towers = cfg.model_config, (cfg.clip_weight_path, cfg.bert_weight_path)
    torch.manual_seed(cfg.seed)
    model = build_model(config, "cpu", attn_impl=cfg.attn_impl)
    if any(towers):
        from cn_clip.clip.model import restore_model

        restore_model(model, *(read_checkpoint(p)["state_dict"] if p else None for p in towers), False)
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
            raise SolutionError(f"{start.source}: its LoRA state does not fit {config.arch} ({misfit})") from None
    trainable, total = trainable_summary(model)
    if trainable == 0:
        raise SolutionError("nothing to train: every parameter is frozen (check --freeze-vision/--freeze-text)")
    log.info("model %s, tuning %s: %d of %d parameters trainable", config.arch, config.tuning["mode"], trainable, total)
    return model


def lr_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """``--layer-decay``: each tower parameter's ``decay ** (L - depth)``, depths as the flag's help says."""
    m, out = unwrap(model), {}
    for prefix, tower in (("visual", m.visual), ("bert", m.bert)):
        names = {id(mod): name + "." for name, mod in tower.named_modules()}
        starts = [names[id(b)] for b in blocks(tower)]
        top = len(starts) + 1
        for name, _ in tower.named_parameters():
            depth = next((d for d, b in enumerate(starts, 1) if name.startswith(b)), top if TOP.match(name) else 0)
            out[f"{prefix}.{name}"] = decay ** (top - depth)
    return out


def make_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW, cn_clip's no weight decay on biases, norms and 0/1-D gains; a group per (lr scale, decay)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
    in_norms = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    scales = lr_scales(model, cfg.layer_decay) if cfg.layer_decay != 1 else {}
    groups: dict[tuple, list] = {(1.0, False): [], (1.0, True): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            gain = id(p) in in_norms or name.endswith("bias") or p.ndim < 2 or "LayerNorm" in name
            groups.setdefault((scales.get(name, 1.0), not gain and "logit_scale" not in name), []).append(p)
    fused = {"fused": True} if all(p.is_cuda for ps in groups.values() for p in ps) else {}
    groups = [{"params": ps, "weight_decay": cfg.wd if d else 0.0, "lr_scale": s} for (s, d), ps in groups.items()]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> str | None:
    """A saved optimizer's moments under this command's settings; on a mismatch, a fresh one and why."""
    fresh = optimizer.state_dict()
    try:
        optimizer.load_state_dict(state)  # checks parameter counts, not shapes
        for p, moments in optimizer.state.items():
            for name, v in moments.items():
                if torch.is_tensor(v) and v.ndim > 0 and v.shape != p.shape:
                    raise ValueError(f"its {name} of shape {tuple(v.shape)} belongs to a parameter of {tuple(p.shape)}")
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        optimizer.load_state_dict(fresh)
        return str(e)
    for group, settings in zip(optimizer.param_groups, fresh["param_groups"]):
        group.update({k: v for k, v in settings.items() if k != "params"})
    return None


def make_scheduler(optimizer, cfg):
    """cn_clip's warmup + cosine (its own function) or a constant rate, times each group's ``lr_scale``."""
    from cn_clip.training.scheduler import cosine_lr

    if cfg.warmup >= cfg.max_steps and not cfg.skip_scheduler:
        log.warning("--warmup %d >= %d steps: the cosine decay never starts", cfg.warmup, cfg.max_steps)
    adjust = cosine_lr(optimizer, cfg.lr, cfg.warmup, cfg.max_steps)

    def schedule(step: int) -> float:
        rate = cfg.lr if cfg.skip_scheduler else float(adjust(step))  # upstream's is a numpy float
        for g in optimizer.param_groups:
            g["lr"] = rate * g.get("lr_scale", 1.0)
        return rate

    return schedule


def wrap(model: nn.Module, d: Dist, use_bn_sync: bool = False) -> nn.Module:
    """The model on this process's device; under DDP when there are several processes."""
    model = model.to(d.device)
    if d.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if use_bn_sync else model
        ids = None if d.device.index is None else [d.device.index]
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model

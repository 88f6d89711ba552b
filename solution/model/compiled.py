"""``--torchcompile`` (open_clip's flag): the towers' repeated blocks compiled in place (one block compiles for
all), refused in one line where that cannot work, and the compile seconds, kept out of step times."""

from __future__ import annotations

import logging
import os
import platform
import shutil

import torch
from torch import nn

from cn_clip_patch.tuning import has_lora, unwrap
from solution.common import SolutionError

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager", "eager")  # all but inductor: for tests


def check_compile(device, backend: str = "inductor") -> None:
    """Refuse where torch.compile cannot run: inductor needs a C++ compiler on the CPU, triton on CUDA."""
    from torch._dynamo import eval_frame
    from torch._inductor import config
    from torch.utils import _triton

    device = torch.device(device)
    if backend not in BACKENDS:
        raise SolutionError(f"--torchcompile backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if not eval_frame.is_dynamo_supported():
        raise SolutionError(f"--torchcompile: torch.compile does not support this Python ({platform.python_version()})")
    cxx = [c for c in (os.environ.get("CXX"), *(config.cpp.cxx or ())) if c and shutil.which(c)]
    if backend == "inductor" and device.type == "cpu" and not cxx:
        raise SolutionError("--torchcompile on the CPU needs a C++ compiler for inductor (g++, clang++ or $CXX)")
    if backend == "inductor" and device.type == "cuda" and not _triton.has_triton():
        raise SolutionError("--torchcompile on CUDA needs triton for inductor (pip install triton, matching torch)")


def blocks(tower: nn.Module) -> list[nn.Module]:
    """A tower's repeated blocks: the children of its outer Sequential/ModuleLists of 2+ modules of one class."""
    out = []
    for child in tower.children():
        kids = list(child.children()) if isinstance(child, (nn.Sequential, nn.ModuleList)) else []
        out.extend(kids if len(kids) >= 2 and len({type(k) for k in kids}) == 1 else blocks(child))
    return out


def compile_towers(model: nn.Module, device, backend: str = "inductor") -> nn.Module:
    """Compile the repeated blocks of ``model``'s image and text towers in place (at their first call); refused
    for peft's LoRA on ``nn.MultiheadAttention``, whose ``Tensor.set_`` AOTAutograd cannot trace."""
    check_compile(device, backend)
    m = unwrap(model)
    if has_lora(m):
        from peft.tuners.lora.layer import MultiheadAttention as LoraMHA

        lora = [name for name, mod in m.named_modules() if isinstance(mod, LoraMHA)]
        if lora:
            raise SolutionError(
                f"--torchcompile cannot compile LoRA on nn.MultiheadAttention ({lora[0]}): drop --torchcompile, or "
                "adapt only the text tower (--lora-targets '.*\\.(query|key|value)$')"
            )
    regions = {name: blocks(getattr(m, name)) for name in ("visual", "bert")}
    if not all(regions.values()):
        raise SolutionError(f"--torchcompile: no repeated blocks in a tower of {type(m).__name__}")
    for block in (b for bs in regions.values() for b in bs):
        block.compile(backend=backend)
    shapes = ", ".join(f"{len(b)} x {type(b[0]).__name__}" for b in regions.values())
    log.info("torch.compile (%s) of the towers' blocks (%s), at their first call (timed apart)", backend, shapes)
    return model


def compile_seconds() -> float:
    """Wall seconds this process has spent in torch.compile so far (dynamo's own count; 0 before any)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


class CompileClock:
    """``lap()``: compile seconds since the last lap (logged at ``step``), summed in ``unreported``; 0: disabled."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.unreported = enabled, 0.0
        self.last = compile_seconds() if enabled else 0.0

    def lap(self, step: int | None = None) -> float:
        now = compile_seconds() if self.enabled else 0.0
        spent, self.last = max(0.0, now - self.last), now
        self.unreported += spent
        if spent > 0 and step is not None:
            log.info("torch.compile: %.1f s compiling at step %d (left out of the step time)", spent, step)
        return spent

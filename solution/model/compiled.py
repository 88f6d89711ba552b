"""``--torchcompile`` (open_clip's flag name): the towers' repeated blocks compiled in place, refused where
that cannot work, and dynamo's own count of compile seconds, so callers keep them out of step times.

Regional compilation: every block of a tower runs the same compiled code (dynamo treats parameters as
inputs), so a tower compiles one block, not its depth; names, state dicts, LoRA, gradient checkpointing
and DDP see the same modules. Refused (one line each): a Python dynamo does not support; inductor
without a C++ compiler (CPU) or triton (CUDA); peft's LoRA on ``nn.MultiheadAttention`` (it swaps weights
with ``Tensor.set_``, which AOTAutograd cannot trace). Backends other than inductor are for tests.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil

import torch
from torch import nn

from cn_clip_patch.tuning import unwrap
from solution.common import SolutionError

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager", "eager")
TOWERS = ("visual", "bert")


def _dynamo_supported() -> bool:
    from torch._dynamo.eval_frame import is_dynamo_supported

    return bool(is_dynamo_supported())


def _cxx_found() -> str | None:
    """The C++ compiler inductor would use on the CPU (its configured candidates, else ``$CXX``), or None."""
    from torch._inductor import config

    names = [c for c in (os.environ.get("CXX"), *(config.cpp.cxx or ())) if c]
    return next((shutil.which(c) for c in names if shutil.which(c)), None)


def _has_triton() -> bool:
    from torch.utils._triton import has_triton

    return bool(has_triton())


def check_compile(device, backend: str = "inductor") -> None:
    """Raise :class:`SolutionError` (one line) where ``torch.compile`` with ``backend`` cannot run on ``device``."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise SolutionError(f"--torchcompile backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if not _dynamo_supported():
        raise SolutionError(
            f"--torchcompile: torch.compile does not support this Python ({platform.python_version()}) in torch "
            f"{torch.__version__}; run without --torchcompile"
        )
    if backend != "inductor":
        return
    if device.type == "cpu" and _cxx_found() is None:
        raise SolutionError(
            "--torchcompile on the CPU needs a C++ compiler for inductor (g++ or clang++, or $CXX); "
            "none was found: install one or run without --torchcompile"
        )
    if device.type == "cuda" and not _has_triton():
        raise SolutionError(
            "--torchcompile on CUDA needs triton for inductor (pip install triton, matching "
            "torch); it is not importable here: install it or run without --torchcompile"
        )


def _lora_on_mha(tower: nn.Module) -> list[str]:
    try:
        from peft.tuners.lora.layer import MultiheadAttention as LoraMHA
    except ImportError:  # no peft: no LoRA
        return []
    return [name for name, mod in tower.named_modules() if isinstance(mod, LoraMHA)]


def blocks(tower: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``tower``: children of an ``nn.Sequential``/``nn.ModuleList`` of 2+ modules of one
    class (the outermost such containers)."""
    out = []
    for child in tower.children():
        kids = list(child.children()) if isinstance(child, (nn.Sequential, nn.ModuleList)) else []
        if len(kids) >= 2 and len({type(k) for k in kids}) == 1:
            out.extend(kids)
        else:
            out.extend(blocks(child))
    return out


def compile_towers(model: nn.Module, device, backend: str = "inductor") -> nn.Module:
    """Compile the repeated blocks of ``model``'s image and text towers in place (lazily: at their first call)
    and return ``model``; :class:`SolutionError` where that cannot work (see the module's docstring)."""
    check_compile(device, backend)
    m = unwrap(model)
    towers = [(name, getattr(m, name, None)) for name in TOWERS]
    missing = [name for name, tower in towers if not isinstance(tower, nn.Module)]
    if missing:
        raise SolutionError(f"--torchcompile: the model has no {' or '.join(missing)} tower to compile")
    for name, tower in towers:
        bad = _lora_on_mha(tower)
        if bad:
            raise SolutionError(
                f"--torchcompile cannot compile LoRA on nn.MultiheadAttention ({name}.{bad[0]}, {len(bad)} layer(s)): "
                "peft swaps its weights with Tensor.set_ in every forward, which torch.compile cannot trace; "
                "drop --torchcompile, or adapt only the text tower (--lora-targets '.*\\.(query|key|value)$')"
            )
    regions = {name: blocks(tower) for name, tower in towers}
    empty = [name for name, b in regions.items() if not b]
    if empty:
        raise SolutionError(
            f"--torchcompile: no repeated blocks found in the {' and '.join(empty)} tower(s) of "
            f"{type(m).__name__}; run without --torchcompile"
        )
    for block in (b for bs in regions.values() for b in bs):
        block.compile(backend=backend)
    log.info(
        "torch.compile (%s) of the towers' blocks (%s): one block of each compiles at its first call (logged, "
        "and left out of step and batch times)",
        backend,
        ", ".join(f"{len(b)} x {type(b[0]).__name__}" for b in regions.values()),
    )
    return model


def compiled(model: nn.Module) -> bool:
    """Whether ``model``'s towers were compiled by :func:`compile_towers`."""
    m = unwrap(model)
    return any(getattr(mod, "_compiled_call_impl", None) is not None for mod in m.modules())


def compile_seconds() -> float:
    """Wall seconds this process has spent in torch.compile so far (dynamo's own count; 0 before any)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except (ImportError, AttributeError):  # another torch: no count, nothing subtracted
        return 0.0


class CompileClock:
    """``lap()``: the compile seconds since the last lap (or since the clock was made)."""

    def __init__(self):
        self.last = compile_seconds()

    def lap(self) -> float:
        now = compile_seconds()
        spent, self.last = max(0.0, now - self.last), now
        return spent

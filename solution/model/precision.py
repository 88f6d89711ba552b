"""Precision names (resolved once where flags are parsed: ``fp16`` is ``amp``, open_clip's ``amp_bf16`` is
``bf16``), the one rule mapping them to the dtype a device computes in, and the float32 matrix-product policy."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("amp", "fp32", "bf16")
PRECISION_ALIASES = {"fp16": "amp", "amp_bf16": "bf16"}
PRECISION_METAVAR = "{" + ",".join(PRECISIONS + tuple(PRECISION_ALIASES)) + "}"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_flag(value: str) -> str:
    """argparse ``type`` of ``--precision``: a name of ``PRECISIONS`` or an alias, resolved."""
    value = PRECISION_ALIASES.get(str(value), str(value))
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {PRECISION_METAVAR[1:-1]})")
    return value


def autocast_dtype(device, precision: str) -> torch.dtype | None:
    """The dtype autocast computes in (None: float32, no autocast; float16 on CUDA only)."""
    precision = PRECISION_ALIASES.get(precision, precision)
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16 if precision == "amp" and torch.device(device).type == "cuda" else None


def autocast(device, precision: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(device, precision)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def grad_scaler(device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled where autocast computes in float16."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, precision) == torch.float16)


def effective_precision(device, precision: str) -> str:
    """What ``precision`` computes in on ``device``: ``fp16``, ``bf16`` or ``fp32``."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(autocast_dtype(device, precision), "fp32")


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without ``torch.`` (``float32``)."""
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def model_math(device) -> Iterator[None]:
    """TF32 for float32 matrix products and convolutions on CUDA inside the block (CPU math untouched)."""
    if torch.device(device).type != "cuda":
        yield
        return
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = cuda.allow_tf32, cudnn.allow_tf32
    cuda.allow_tf32 = cudnn.allow_tf32 = True
    try:
        yield
    finally:
        cuda.allow_tf32, cudnn.allow_tf32 = saved


@contextlib.contextmanager
def exact_math() -> Iterator[None]:
    """Full float32 products inside the block, whatever the caller set: no TF32 nor bf16 reduced-precision
    reductions on CUDA, IEEE oneDNN products on the CPU where the caller allowed less (untouched if never set)."""
    cuda, mkl = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved, saved_mkl = (cuda.allow_bf16_reduced_precision_reduction, cuda.allow_tf32), mkl.fp32_precision
    cuda.allow_bf16_reduced_precision_reduction, cuda.allow_tf32 = False, False
    if saved_mkl not in ("none", "ieee"):
        mkl.fp32_precision = "ieee"
    try:
        yield
    finally:
        cuda.allow_bf16_reduced_precision_reduction, cuda.allow_tf32 = saved
        if saved_mkl not in ("none", "ieee"):
            mkl.fp32_precision = saved_mkl

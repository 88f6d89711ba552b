"""Precision: the names of the compute precisions and weight dtypes, what a precision computes in, and the
float32 matrix-product policy.

``PRECISIONS`` are the ``--precision`` choices of extraction and the soup (autocast, see
:func:`solution.common.autocast_context`); :func:`precision_flag` is their argparse type, which also
takes open_clip's spelling ``amp_bf16`` and resolves it once, where the flags are parsed, to ``bf16``
(what runs, ``params.json`` and every later comparison see). ``DTYPES`` the dtypes a soup is saved
in, by name.

TF32 policy (context managers: the previous setting is restored when the block ends, nothing
outlives its call): :func:`model_math` allows TF32 for the model's float32 matrix products and
convolutions on CUDA (training, extraction: the same speed/accuracy trade as autocast; CPU math is
left as it is), and :func:`exact_math` forces full float32 (``highest``: no TF32, no bf16 reduced-
precision reductions, no oneDNN TF32/bf16 on the CPU) for exact ranking, whatever the caller set.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("amp", "fp16", "fp32", "bf16")
PRECISION_ALIASES = {"amp_bf16": "bf16"}  # open_clip's name for bf16 autocast
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_flag(value: str) -> str:
    """argparse ``type`` of ``--precision``: a name of ``PRECISIONS`` or an alias, resolved (``amp_bf16`` -> ``bf16``)."""
    value = PRECISION_ALIASES.get(str(value), str(value))
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {value!r} (choose from {', '.join(PRECISIONS + tuple(PRECISION_ALIASES))})"
        )
    return value


PRECISION_METAVAR = "{" + ",".join(PRECISIONS + tuple(PRECISION_ALIASES)) + "}"


def effective_precision(device, precision: str) -> str:
    """What a precision flag computes in on a device: CPU runs fp32 unless bf16 is asked for."""
    device = torch.device(device)
    precision = PRECISION_ALIASES.get(precision, precision)
    if device.type == "cuda":
        return "fp16" if precision in ("amp", "fp16") else precision
    return "bf16" if precision == "bf16" else "fp32"


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without ``torch.`` (``float32``): how a soup records its dtype."""
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def model_math(device) -> Iterator[None]:
    """TF32 for float32 matrix products and convolutions on CUDA for the block (model math), restored after.

    Only CUDA is changed (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``);
    on the CPU the block runs with whatever the caller set (no TF32 there).
    """
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
    """Full float32 products for the block (``highest``), whatever the caller set; restored after.

    CUDA: no TF32 and no bf16 reduced-precision reductions inside a bf16 product (the prefilter's
    certificate assumes fp32 accumulation). CPU: oneDNN matrix products in IEEE float32 where the
    caller allowed TF32/bf16 (``torch.set_float32_matmul_precision('high'|'medium')``); left alone
    where it never was set (so the legacy and the new precision APIs are never mixed).
    """
    cuda, mkl = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = cuda.allow_bf16_reduced_precision_reduction, cuda.allow_tf32
    saved_mkl = mkl.fp32_precision
    cuda.allow_bf16_reduced_precision_reduction, cuda.allow_tf32 = False, False
    if saved_mkl not in ("none", "ieee"):
        mkl.fp32_precision = "ieee"
    try:
        yield
    finally:
        cuda.allow_bf16_reduced_precision_reduction, cuda.allow_tf32 = saved
        if saved_mkl not in ("none", "ieee"):
            mkl.fp32_precision = saved_mkl

"""Precision: the names of the compute precisions and weight dtypes, and what a precision computes in.

``PRECISIONS`` are the ``--precision`` choices of extraction and the soup (autocast, see
:func:`solution.common.autocast_context`); ``DTYPES`` the dtypes a soup is saved in, by name.
"""
from __future__ import annotations

import torch

PRECISIONS = ("amp", "fp16", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def effective_precision(device, precision: str) -> str:
    """What a precision flag computes in on a device: CPU runs fp32 unless bf16 is asked for."""
    device = torch.device(device)
    if device.type == "cuda":
        return "fp16" if precision in ("amp", "fp16") else precision
    return "bf16" if precision == "bf16" else "fp32"


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without ``torch.`` (``float32``): how a soup records its dtype."""
    return str(dtype).replace("torch.", "")

"""The CPU path: run upstream cn_clip code, which calls ``Tensor.cuda`` inline, on any device.

``with on_device("cpu"): ...`` redirects ``Tensor.cuda``/``Module.cuda`` and
``torch.cuda.set_device`` to the given device for the duration of the block, and
:func:`single_process_group` gives upstream's ``dist.*`` calls a one-process gloo group.
Used to referee and to benchmark upstream side by side with our code; our own code takes the
device as a parameter and never needs this.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import socket
import sys
import warnings

import torch
import torch.distributed as dist


@contextlib.contextmanager
def on_device(device: str | torch.device = "cpu"):
    device = torch.device(device)
    saved = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.set_device)

    def tensor_cuda(self, *args, non_blocking=False, **kwargs):
        return self.to(device, non_blocking=non_blocking)

    def module_cuda(self, *args, **kwargs):
        return self.to(device)

    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda
    torch.cuda.set_device = lambda *a, **k: None
    try:
        yield device
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.set_device = saved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group(backend: str = "gloo"):
    """A world of one, for upstream functions that call ``dist.get_world_size``/``all_reduce``."""
    if dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_upstream_main(module: str, argv: list[str], device: str | torch.device = "cpu", quiet: bool = True) -> str:
    """Run an upstream script (``python -m module *argv``) in this process on ``device``; its output.

    E.g. ``run_upstream_main("cn_clip.eval.evaluation", [gold, pred, out])``: how the tests
    referee against upstream and the benchmarks time it, with no upstream file touched.
    """
    saved = sys.argv
    sys.argv = [module.rsplit(".", 1)[-1] + ".py", *map(str, argv)]
    sink = io.StringIO()
    try:
        with on_device(device), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
            with (
                contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext(),
                contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext(),
            ):
                runpy.run_module(module, run_name="__main__")
    finally:
        sys.argv = saved
    return sink.getvalue()

"""Tuning modes over an upstream cn_clip ``CLIP``: full, LoRA (peft) on both towers, frozen towers.

- :func:`inject_lora` puts peft LoRA adapters into the model in place: by default on the ViT's
  ``nn.MultiheadAttention`` blocks (peft adapts ``in_proj`` and ``out_proj`` together) and on
  BERT's ``query``/``key``/``value`` Linears. Everything else is frozen.
- :func:`merged_state_dict` computes the plain cn_clip state dict (adapters folded into the
  base weights) *without touching the live adapted model*, so training continues unchanged and
  the checkpoint loads into an unmodified ``cn_clip.clip.model.CLIP``.
- :func:`adapter_state_dict` is the adapter alone (the ``lora_A``/``lora_B`` tensors).
- :func:`freeze_vision` has cn_clip's ``--freeze-vision`` semantics (no gradient for
  ``model.visual``; BatchNorm statistics frozen too for ResNet backbones), :func:`freeze_text`
  does the same for the BERT tower (and the text projection), which upstream lacks.
- :func:`set_train_mode` is ``model.train()`` that keeps frozen BatchNorms in eval mode: call it
  wherever upstream calls ``model.train()`` + ``freeze_vision_bn``.
- :func:`grad_checkpointing` is a context manager: gradient checkpointing with non-reentrant
  checkpoints while its ``with`` block runs (upstream's ``checkpoint`` names restored on exit).

The tuning recipe travels as a plain dict (stored in checkpoints as ``config["tuning"]``)::

    {"mode": "full"|"lora", "freeze_vision": bool, "freeze_text": bool,
     "lora": {"rank", "alpha", "dropout", "targets"} or None, "merged": bool}
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import sys
from collections.abc import Iterator, Mapping

import torch
from torch import nn

DEFAULT_LORA_TARGETS = r".*\.(attn|query|key|value)$"
ADAPTER = "default"

# Text-side parameters outside ``model.bert`` that belong to the text tower.
_TEXT_EXTRA = ("text_projection",)


def tuning_recipe(
    *,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: str = DEFAULT_LORA_TARGETS,
    freeze_vision: bool = False,
    freeze_text: bool = False,
) -> dict:
    """The tuning dict for a set of flags (``lora_rank`` 0 means full fine-tuning)."""
    lora = None
    if lora_rank and lora_rank > 0:
        lora = {
            "rank": int(lora_rank),
            "alpha": float(lora_alpha if lora_alpha is not None else 2 * lora_rank),
            "dropout": float(lora_dropout),
            "targets": lora_targets or DEFAULT_LORA_TARGETS,
        }
    return {
        "mode": "lora" if lora else "full",
        "freeze_vision": bool(freeze_vision),
        "freeze_text": bool(freeze_text),
        "lora": lora,
        "merged": False,
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _is_resnet(model: nn.Module) -> bool:
    from cn_clip.clip.model import ModifiedResNet

    return isinstance(unwrap(model).visual, ModifiedResNet)


def vision_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for n, p in unwrap(model).visual.named_parameters():
        yield f"visual.{n}", p


def text_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    m = unwrap(model)
    for n, p in m.bert.named_parameters():
        yield f"bert.{n}", p
    for n in _TEXT_EXTRA:
        if isinstance(getattr(m, n, None), nn.Parameter):
            yield n, getattr(m, n)


def freeze_vision(model: nn.Module) -> None:
    """cn_clip's ``--freeze-vision``: no gradients for the image tower (BN stats frozen by set_train_mode)."""
    for _, p in vision_parameters(model):
        p.requires_grad_(False)


def freeze_text(model: nn.Module) -> None:
    """The text tower (BERT + text projection) gets no gradients; new, upstream lacks it."""
    for _, p in text_parameters(model):
        p.requires_grad_(False)


def set_train_mode(model: nn.Module, tuning: Mapping | None) -> nn.Module:
    """``model.train()``, with a frozen ResNet image tower's BatchNorm layers left in eval mode (their running
    statistics stay fixed, as cn_clip's ``freeze_vision_bn`` does)."""
    model.train()
    tuning = tuning or {}
    m = unwrap(model)
    if tuning.get("freeze_vision") and _is_resnet(m):
        for mod in m.visual.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
    return model


def inject_lora(model: nn.Module, lora: Mapping) -> nn.Module:
    """Add peft LoRA adapters in place (both towers) and freeze everything but the adapters.

    Returns the same module object. ``logit_scale`` stays trainable (it is one scalar).
    """
    from peft import LoraConfig, inject_adapter_in_model

    m = unwrap(model)
    targets = lora.get("targets") or DEFAULT_LORA_TARGETS
    names = [n for n, _ in m.named_modules() if re.fullmatch(targets, n)]
    if not names:
        raise ValueError(f"LoRA target pattern {targets!r} matches no module of the model")
    cfg = LoraConfig(
        r=int(lora["rank"]),
        lora_alpha=float(lora["alpha"]),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=targets,
    )
    inject_adapter_in_model(cfg, m, adapter_name=ADAPTER)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n or n == "logit_scale")
    return model


def apply_tuning(model: nn.Module, tuning: Mapping | None) -> nn.Module:
    """Apply a tuning recipe to a freshly built/loaded plain model (in place; returns it)."""
    tuning = tuning or {}
    if tuning.get("lora"):
        inject_lora(model, tuning["lora"])
        # freezing on top of LoRA: drop the adapters of the frozen tower too
    if tuning.get("freeze_vision"):
        freeze_vision(model)
    if tuning.get("freeze_text"):
        freeze_text(model)
    set_train_mode(model, tuning)
    return model


@contextlib.contextmanager
def grad_checkpointing(model: nn.Module, enable: bool = True) -> Iterator[nn.Module]:
    """cn_clip's ``set_grad_checkpointing`` with non-reentrant checkpoints, for the ``with`` block.

    Upstream calls ``torch.utils.checkpoint.checkpoint(block, x)`` with the reentrant default,
    which drops the gradients of parameters inside a block whose input does not require grad
    (LoRA adapters and frozen-tower runs) and warns on recent PyTorch. Inside the block, the
    module-level ``checkpoint`` names of ``cn_clip.clip.model`` and ``cn_clip.clip.modeling_bert``
    are ``checkpoint(..., use_reentrant=False)`` and the model's towers checkpoint their blocks;
    on exit (error included) both names are upstream's again and the model's switch is off.
    Yields the model.
    """
    import cn_clip.clip.model as upstream_model
    import cn_clip.clip.modeling_bert as upstream_bert
    from torch.utils.checkpoint import checkpoint

    patched = functools.partial(checkpoint, use_reentrant=False)
    saved = [(mod, mod.checkpoint) for mod in (upstream_model, upstream_bert)]
    m = unwrap(model)
    try:
        if enable:
            for mod, _ in saved:
                mod.checkpoint = patched
        m.set_grad_checkpointing(enable)
        yield model
    finally:
        m.set_grad_checkpointing(False)
        for mod, original in saved:
            mod.checkpoint = original


def has_lora(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # nothing can have injected an adapter; importing peft costs seconds
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(mod, LoraLayer) for mod in unwrap(model).modules())


def _plain_key(key: str) -> str:
    return key.replace(".base_layer", "")


def _copy_to(module: nn.Module, device: torch.device | str) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are copies on ``device``, made tensor by
    tensor from the originals (never a second copy on the module's own device).

    The tensors are read from the modules' ``_parameters``/``_buffers`` themselves: peft's LoRA
    ``MultiheadAttention`` re-registers its base weights as new ``Parameter`` objects whenever its
    ``parameters()``/``state_dict()`` are called, so those would name objects the copy no longer holds."""
    memo: dict = {}
    stack, seen = [module], set()
    while stack:
        mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is not None and id(t) not in memo:
                c = t.detach().to(device, copy=True)
                memo[id(t)] = nn.Parameter(c, requires_grad=False) if isinstance(t, nn.Parameter) else c
        stack.extend(c for c in mod._modules.values() if c is not None)
    return copy.deepcopy(module, memo)


@torch.no_grad()
def merged_state_dict(model: nn.Module, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The plain cn_clip state dict of a (possibly LoRA-adapted) model, adapters folded in, on ``device``.

    Each top-level LoRA layer is copied on its own to ``device`` (the CPU by default: a checkpoint
    save never allocates a second model, nor even a layer, on the accelerator) and merged there with
    peft's ``merge()`` (the same code peft's forward uses), so the result reproduces the adapted
    model's outputs whatever peft's merge arithmetic is; the live model is never modified. Keys carry
    no ``module.`` prefix; tensors are detached copies on ``device``.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import MultiheadAttention as LoraMHA

    m = unwrap(model)
    out = {_plain_key(k): v.detach().to(device, copy=True) for k, v in m.state_dict().items() if "lora_" not in k}
    lora_names = [n for n, mod in m.named_modules() if isinstance(mod, LoraLayer)]
    top = [n for n in lora_names if not any(n.startswith(o + ".") for o in lora_names if o != n)]
    modules = dict(m.named_modules())
    for name in top:
        mod = modules[name]
        if getattr(mod, "merged", False):
            raise ValueError(f"LoRA layer {name} is already merged; cannot fold it twice")
        work = _copy_to(mod, device)
        work.merge()
        base = work.get_base_layer()
        plain = _plain_key(name)
        if isinstance(mod, LoraMHA):
            tensors = {"in_proj_weight": base.in_proj_weight, "out_proj.weight": base.out_proj.get_base_layer().weight}
        else:
            tensors = {"weight": base.weight}
        for suffix, t in tensors.items():
            key = f"{plain}.{suffix}"
            if key not in out:
                raise KeyError(f"cannot merge LoRA layer {name}: no base weight {key}")
            out[key] = t.detach().to(out[key].dtype)
        del work
    return out


def adapter_state_dict(model: nn.Module, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (peft key names), detached copies on ``device`` (the CPU by default)."""
    return {k: v.detach().to(device, copy=True) for k, v in unwrap(model).state_dict().items() if "lora_" in k}


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

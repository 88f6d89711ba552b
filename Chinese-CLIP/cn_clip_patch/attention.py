"""Fused attention (``torch.nn.functional.scaled_dot_product_attention``) for both cn_clip towers.

Text tower
    Upstream's ``BertSelfAttention.forward`` computes attention by hand (``matmul`` → ``/ sqrt(d)``
    → ``+ mask`` → ``softmax`` → ``dropout`` → ``matmul``), and its only fused switch needs
    ``flash-attn < 2``. :class:`SdpaBertSelfAttention` is a subclass of upstream's class whose
    ``forward`` does the same computation in one SDPA call:

    - the padding mask is upstream's own *extended additive* mask (``0`` / ``-10000``, shape
      ``[B, 1, 1, L]``, built by ``BertModel.forward``), passed unchanged as SDPA's float
      ``attn_mask`` (SDPA adds a float mask to the scaled scores, exactly like upstream);
    - attention dropout is ``self.dropout.p`` while ``self.dropout`` is in training mode, else 0,
      as upstream's ``nn.Dropout`` on the probabilities;
    - a per-head ``head_mask`` (``[..., H, 1, 1]``, the shapes ``BertModel`` builds) scales the
      context, which equals upstream's scaling of the probabilities; any other ``head_mask`` and
      ``output_attentions`` (attention probabilities requested) run upstream's own forward;
    - ``query``/``key``/``value`` are *called* (never their ``.weight``), so peft LoRA wrappers
      on them keep working, whether they are injected before or after the switch.

    On CPU, SDPA picks the fused flash kernel when ``dropout_p == 0`` (eval, or dropout 0) and its
    math fallback with dropout; on CUDA the memory-efficient kernel takes the float mask and
    dropout.

How it is installed (nothing global changes)
    :func:`use_sdpa` swaps ``module.__class__`` of each ``BertSelfAttention`` *instance* found in
    the model it is given to :class:`SdpaBertSelfAttention` (and back with ``enabled=False``).
    No upstream class, module attribute or torch function is touched: other models in the process,
    and new ones, keep upstream's code. Parameters, buffers, state-dict keys and child modules
    are unchanged (``isinstance(m, BertSelfAttention)`` still holds), so checkpoints, LoRA merge and
    ``torch.compile`` see the same model. :func:`sdpa_attention` is the scoped form: it installs
    on the instances not already switched and switches back exactly those on exit.

Vision tower (checked, nothing to patch)
    Upstream's ``ResidualAttentionBlock.attention`` calls ``nn.MultiheadAttention(x, x, x,
    need_weights=False, attn_mask=None)`` with ``batch_first=False``. The MHA "fast path" is never
    taken (``batch_first`` is False), so every call, in training and in eval, with or without
    grad, goes through ``F.multi_head_attention_forward``, whose ``need_weights=False`` branch
    calls ``scaled_dot_product_attention`` (torch 2.x). peft's LoRA ``MultiheadAttention``
    wrapper merges its adapters and calls that same base forward with the same arguments, and
    ``AttentionPool2d`` of the ResNet backbones also passes ``need_weights=False``. So the vision
    tower already reaches SDPA; :func:`vision_reaches_sdpa` checks it with torch's profiler
    (``tests/test_attention.py`` asserts it for train/eval/LoRA).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from cn_clip.clip.modeling_bert import BertSelfAttention
from torch import nn

from .tuning import unwrap

log = logging.getLogger(__name__)

__all__ = ["SdpaBertSelfAttention", "sdpa_attention", "sdpa_enabled", "use_sdpa", "vision_reaches_sdpa"]


class SdpaBertSelfAttention(BertSelfAttention):
    """Upstream's ``BertSelfAttention`` with its attention core computed by SDPA (same outputs).

    Never constructed directly: :func:`use_sdpa` switches existing instances to this class.
    """

    def forward(self, hidden_states, attention_mask=None, head_mask=None):
        per_head = head_mask is None or (head_mask.dim() >= 3 and head_mask.shape[-1] == 1 and head_mask.shape[-2] == 1)
        if self.output_attentions or not per_head:
            return super().forward(hidden_states, attention_mask, head_mask)  # probabilities needed: upstream's path
        query = self.transpose_for_scores(self.query(hidden_states))
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        mask = attention_mask
        if mask is not None and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)  # autocast: projections are half, the extended mask is fp32
        dropout_p = float(getattr(self.dropout, "p", 0.0)) if self.dropout.training else 0.0
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)
        if head_mask is not None:
            context = context * head_mask  # (P * m) @ V == m * (P @ V) for a mask constant per head
        context = context.permute(0, 2, 1, 3)
        context = context.reshape(*context.shape[:2], self.all_head_size)
        return (context,)


def _self_attentions(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, mod in unwrap(model).named_modules():
        if isinstance(mod, BertSelfAttention):
            yield name, mod


def use_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Switch the text tower of ``model`` to SDPA attention in place (``enabled=False``: back).

    Per instance: each ``BertSelfAttention`` of this model has its ``__class__`` set to
    :class:`SdpaBertSelfAttention` (or back to ``BertSelfAttention``). Idempotent. Subclasses of
    upstream's class other than ours are left alone (their forward is unknown) with a warning.
    Returns the number of modules switched by this call.
    """
    changed = 0
    for name, mod in _self_attentions(model):
        cls = type(mod)
        if enabled and cls is BertSelfAttention:
            mod.__class__ = SdpaBertSelfAttention
            changed += 1
        elif not enabled and cls is SdpaBertSelfAttention:
            mod.__class__ = BertSelfAttention
            changed += 1
        elif cls not in (BertSelfAttention, SdpaBertSelfAttention):
            log.warning("use_sdpa: %s is a %s, not upstream's BertSelfAttention; left unchanged", name, cls.__name__)
    if changed:
        log.debug("use_sdpa(enabled=%s): %d self-attention modules switched", enabled, changed)
    return changed


@contextlib.contextmanager
def sdpa_attention(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Scoped :func:`use_sdpa`: inside, the text tower uses SDPA; on exit, the modules this call
    switched are switched back (modules already on SDPA before it stay so). Yields the model."""
    switched = [mod for _, mod in _self_attentions(model) if type(mod) is BertSelfAttention] if enabled else []
    for mod in switched:
        mod.__class__ = SdpaBertSelfAttention
    try:
        yield model
    finally:
        for mod in switched:
            if type(mod) is SdpaBertSelfAttention:
                mod.__class__ = BertSelfAttention


def sdpa_enabled(model: nn.Module) -> bool:
    """True when every ``BertSelfAttention`` of the model runs on SDPA (False if it has none)."""
    mods = [mod for _, mod in _self_attentions(model)]
    return bool(mods) and all(isinstance(mod, SdpaBertSelfAttention) for mod in mods)


def vision_reaches_sdpa(model: nn.Module, images: torch.Tensor, *, train: bool = False) -> bool:
    """Whether ``model.encode_image(images)`` calls ``scaled_dot_product_attention`` (torch profiler).

    ``train=True`` runs it in training mode with grad (and a backward, which leaves
    ``.grad`` alone); every module's training flag is restored afterwards.
    """
    from torch.profiler import ProfilerActivity, profile

    m = unwrap(model)
    modes = {mod: mod.training for mod in m.modules()}
    m.train(train)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.set_grad_enabled(train):
            out = m.encode_image(images)
            params = [p for p in m.parameters() if p.requires_grad]
            if train and out.requires_grad and params:  # backward without touching any .grad
                torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    return any(e.key == "aten::scaled_dot_product_attention" for e in prof.key_averages())

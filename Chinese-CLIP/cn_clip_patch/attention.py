"""Fused attention (``scaled_dot_product_attention``) for cn_clip's text tower, per model instance: :func:`use_sdpa`
switches the ``__class__`` of a model's own ``BertSelfAttention`` instances (no upstream class or torch function
changes; parameters and state-dict keys stay). The vision tower already reaches SDPA (``nn.MultiheadAttention`` with
``need_weights=False``)."""

from __future__ import annotations

import logging

import torch.nn.functional as F
from cn_clip.clip.modeling_bert import BertSelfAttention
from torch import nn

from .tuning import unwrap

log = logging.getLogger(__name__)

__all__ = ["SdpaBertSelfAttention", "use_sdpa"]


class SdpaBertSelfAttention(BertSelfAttention):
    """Upstream's ``BertSelfAttention`` with its attention core in one SDPA call: the extended additive padding mask as
    ``attn_mask``, ``self.dropout.p`` while training, a per-head ``head_mask`` on the context (other head masks and
    ``output_attentions`` run upstream's forward); ``query``/``key``/``value`` are called, so LoRA wrappers work."""

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


def use_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Switch the text tower of ``model`` to SDPA attention in place (``enabled=False``: back); idempotent.
    Other subclasses of upstream's class are left alone with a warning. Returns how many modules switched."""
    changed = 0
    for name, mod in unwrap(model).named_modules():
        cls = type(mod)
        if not isinstance(mod, BertSelfAttention):
            continue
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

"""The training step: cn_clip's contrastive loss over the global batch (2 processes at batch B train what one at 2B
trains), its feature-caching accumulation, same-text twins not negatives; the weights' EMA."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from torch import nn

from cn_clip_patch.tuning import unwrap
from solution.common import SolutionError
from solution.model.precision import autocast, grad_scaler

LOGIT_SCALE_MAX = math.log(100.0)  # cn_clip clamps at 4.6052


def gather(t: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """``t`` of every process concatenated in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if with_grad:  # the autograd gather that works on gloo (the functional one needs reduce_scatter)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
            return torch.cat(dist_nn.all_gather(t), dim=0)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def twin_mask(text_ids: torch.Tensor, same_text: bool) -> torch.Tensor | None:
    """``[N, N]`` True where ``j != i`` has the same text id; None if no twins."""
    if not same_text:
        return None
    eq = text_ids[:, None].eq(text_ids[None, :])
    eq.fill_diagonal_(False)
    return eq if bool(eq.any()) else None


def clip_loss(image_features, text_features, logit_scale, twins: torch.Tensor | None):
    """Symmetric InfoNCE in float32, twins left out of the negatives: ``(loss, logits_per_image)``."""
    with torch.autocast(image_features.device.type, enabled=False):
        logits = logit_scale.float() * image_features.float() @ text_features.float().t()
        lpi, lpt = logits, logits.t()
        if twins is not None:
            twins = twins.to(logits.device)
            lpi, lpt = lpi.masked_fill(twins, float("-inf")), lpt.masked_fill(twins.t(), float("-inf"))
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(lpi, labels) + F.cross_entropy(lpt, labels)) / 2, logits


@torch.no_grad()
def batch_accuracy(logits_per_image: torch.Tensor, twins: torch.Tensor | None) -> tuple[float, float]:
    """(i2t, t2i) in-batch accuracy: the argmax is the pair itself or one of its twins."""
    idx = torch.arange(len(logits_per_image), device=logits_per_image.device)
    pos = idx[:, None] == idx[None, :]
    if twins is not None:
        pos = pos | twins.to(pos.device)
    i2t = pos[idx, logits_per_image.argmax(1)]
    t2i = pos.t()[idx, logits_per_image.argmax(0)]
    return float(i2t.float().mean()), float(t2i.float().mean())


class Stepper:
    """One optimizer step over micro-batches ``(images, tokens, text_ids, image_ids)``; :meth:`read` syncs."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, cfg):
        self.model, self.optimizer, self.device, self.cfg = model, optimizer, device, cfg
        self.scaler = grad_scaler(device, cfg.precision)
        self.bad_loss = torch.zeros((), device=device)  # the last non-finite loss (kept on the device: no sync)

    def _gather(self, t: torch.Tensor, with_grad: bool) -> torch.Tensor:
        return t if self.cfg.skip_aggregate else gather(t, with_grad)

    def check(self) -> None:
        """Raise if a step since the last check had a non-finite loss (before each log line, validation, save)."""
        value = float(self.bad_loss)
        if not math.isfinite(value):
            raise SolutionError(f"training loss is {value}: diverged (try a lower --lr or fp32); no checkpoint written")

    def read(self, out: dict) -> dict:
        i2t, t2i = batch_accuracy(out["logits"], out["twins"])
        scale = float(unwrap(self.model).logit_scale.detach().exp())
        return {"loss": float(out["loss"]), "acc_i2t": i2t, "acc_t2i": t2i, "logit_scale": scale, "pairs": out["pairs"]}

    def __call__(self, micro_batches: list) -> dict:
        cfg, model, dev = self.cfg, self.model, self.device
        moved = [(im.to(dev, non_blocking=True), tok.to(dev, non_blocking=True)) for im, tok, _, _ in micro_batches]
        self.optimizer.zero_grad(set_to_none=True)
        all_ids = torch.cat([self._gather(tid.to(dev), False) for _, _, tid, _ in micro_batches])
        twins = twin_mask(all_ids, cfg.same_text_positives)
        cached_img, cached_txt = [], []
        if len(moved) > 1:
            with torch.no_grad(), autocast(dev, cfg.precision):
                for images, tokens in moved:
                    img_f, txt_f, _ = model(images, tokens)
                    cached_img.append(self._gather(img_f, False))
                    cached_txt.append(self._gather(txt_f, False))
        for j, (images, tokens) in enumerate(moved):
            last = j == len(moved) - 1
            with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                with autocast(dev, cfg.precision):
                    img_f, txt_f, scale = model(images, tokens, cfg.mask_ratio)
                    img_all = torch.cat([*cached_img[:j], self._gather(img_f, True), *cached_img[j + 1 :]])
                    txt_all = torch.cat([*cached_txt[:j], self._gather(txt_f, True), *cached_txt[j + 1 :]])
                    loss, logits = clip_loss(img_all, txt_all, scale.mean(), twins)
                self.bad_loss = torch.where(torch.isfinite(loss.detach()), self.bad_loss, loss.detach().float())
                self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            unwrap(model).logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        return {"loss": loss.detach(), "logits": logits.detach(), "twins": twins, "pairs": len(all_ids)}


class EMA:
    """``--ema-decay D``: ``ema = D * ema + (1 - D) * w`` for each trained tensor after each step, from the start's."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.params = decay, [p for p in unwrap(model).parameters() if p.requires_grad] if decay else []
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        if self.params:
            torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.decay)

    @torch.no_grad()
    def load(self, saved: list | None) -> None:
        for e, t in zip(self.shadow, saved or []):  # none saved (EMA newly on): the current weights
            e.copy_(t)

    @contextlib.contextmanager
    def swapped(self):
        """The EMA in the model's tensors for the block (the live weights in the EMA's), then back, exactly."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for p, e in zip(self.params, self.shadow):
            live = p.detach().clone()
            p.copy_(e)
            e.copy_(live)

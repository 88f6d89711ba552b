"""The training step: contrastive loss over the global batch, accumulation, validation loss.

Global batch. One optimizer step sees ``accum_freq`` micro-batches of ``batch_size x world``
pairs each. Features are gathered across processes *with gradient*
(``torch.distributed.nn.all_gather``) in rank order, so 2 processes with batch B train exactly
the model one process with batch 2B trains (every rank computes the same global loss; DDP's
gradient average then equals the single-process gradient).

Same text, not a negative (``--same-text-positives``, on by default). MUGE queries have several
gold images, so a batch may hold one text (same ``text_id``) twice, paired with different images
(and the padding of the last batch repeats pairs). Plain CLIP loss counts the twin's pair as a
negative: image ``i`` is pushed away from text ``j`` although it is the same query as text ``i``.
With the option, those twin entries (``j != i`` with ``text_id[j] == text_id[i]``) are removed
from the softmax denominators in both directions (masked to -inf), so each pair is contrasted
only against real negatives. Without twins this is exactly cn_clip's loss. (Soft targets spread
over the twins would not help: with identical twin features they give exactly the plain loss.)
In-batch accuracy counts an argmax that lands on any positive.

Accumulation (``--accum-freq``) follows cn_clip: features of all micro-batches are first
computed without gradient and cached; then each micro-batch is re-run with gradient and its fresh
features replace its cached slice in the full-batch loss, backward each time, one optimizer step.
(As in cn_clip, ``logit_scale`` collects one gradient per micro-batch.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from torch import nn

from cn_clip_patch.tuning import unwrap
from solution.common import SolutionError, autocast_context

log = logging.getLogger(__name__)
# torch.distributed.nn.all_gather is the autograd gather that also works on gloo (its backward is
# an all-to-all); the suggested functional replacement needs reduce_scatter, which gloo lacks.
warnings.filterwarnings(
    "ignore", message=r".*torch\.distributed\.nn\.functional\.all_gather is deprecated", category=FutureWarning
)

LOGIT_SCALE_MAX = math.log(100.0)  # cn_clip clamps at 4.6052


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(t: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``t`` from every process in rank order (identity for one process)."""
    rank, size = world()
    if size == 1:
        return t
    if with_grad:
        return torch.cat(dist_nn.all_gather(t), dim=0)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def twin_mask(text_ids: torch.Tensor, same_text: bool) -> torch.Tensor | None:
    """``[N, N]`` True where ``j != i`` has the same text id (a positive, not a negative); None if no twins."""
    if not same_text:
        return None
    eq = text_ids[:, None].eq(text_ids[None, :])
    eq.fill_diagonal_(False)
    return eq if bool(eq.any()) else None


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, twins: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE (cn_clip's); twins left out of the negatives. Returns ``(loss, logits_per_image)``.
    Computed in float32 with autocast off (under autocast the matmul would run in fp16/bf16)."""
    with torch.autocast(image_features.device.type, enabled=False):
        return _clip_loss(image_features.float(), text_features.float(), logit_scale.float(), twins)


def _clip_loss(image_features, text_features, logit_scale, twins):
    logits_per_image = logit_scale * image_features @ text_features.t()
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    if twins is None:
        lpi, lpt = logits_per_image, logits_per_image.t()
    else:
        twins = twins.to(logits_per_image.device)
        lpi = logits_per_image.masked_fill(twins, float("-inf"))
        lpt = logits_per_image.t().masked_fill(twins.t(), float("-inf"))
    loss = (F.cross_entropy(lpi, labels) + F.cross_entropy(lpt, labels)) / 2
    return loss, logits_per_image


@torch.no_grad()
def batch_accuracy(logits_per_image: torch.Tensor, twins: torch.Tensor | None) -> tuple[float, float]:
    """(i2t, t2i) in-batch accuracy: the argmax is the pair itself or one of its twins."""
    n = len(logits_per_image)
    idx = torch.arange(n, device=logits_per_image.device)
    pos = idx[:, None] == idx[None, :]
    if twins is not None:
        pos = pos | twins.to(pos.device)
    i2t = pos[idx, logits_per_image.argmax(1)]
    t2i = pos.t()[idx, logits_per_image.argmax(0)]
    return float(i2t.float().mean()), float(t2i.float().mean())


@dataclass
class StepConfig:
    device: torch.device
    precision: str = "fp32"
    accum_freq: int = 1
    mask_ratio: float = 0.0
    same_text: bool = True
    aggregate: bool = True


class Stepper:
    """One optimizer step over ``accum_freq`` micro-batches ``(images, tokens, text_ids, image_ids)``;
    returns the step's loss, logits and twins as tensors (:meth:`read` turns them into numbers)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, cfg: StepConfig):
        self.model, self.optimizer, self.scaler, self.cfg = model, optimizer, scaler, cfg
        self.bad_loss: torch.Tensor | None = None  # the last non-finite loss since the last check (0: none)

    def _autocast(self):
        return autocast_context(self.cfg.device, self.cfg.precision)

    def _gather(self, t: torch.Tensor, with_grad: bool) -> torch.Tensor:
        return gather(t, with_grad) if self.cfg.aggregate else t

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _note(self, loss: torch.Tensor) -> None:
        """Remember a non-finite loss on the device (no host sync); :meth:`check` reads it."""
        loss = loss.detach().float()
        if self.bad_loss is None:
            self.bad_loss = torch.zeros((), device=loss.device)
        self.bad_loss = torch.where(torch.isfinite(loss), self.bad_loss, loss)

    def check(self) -> None:
        """Raise if a step since the last check had a non-finite loss. The trainer calls it at its log
        steps and before each validation and save, so no checkpoint is written from a diverged state."""
        if self.bad_loss is None:
            return
        value = float(self.bad_loss)
        if not math.isfinite(value):
            raise SolutionError(
                f"training loss is {value}: the run diverged (try a lower --lr or --precision fp32); "
                "no checkpoint was written from this state"
            )

    def read(self, out: dict) -> dict:
        """The step's numbers as floats (host syncs: read them only where they are logged)."""
        i2t, t2i = batch_accuracy(out["logits"], out["twins"])
        return {
            "loss": float(out["loss"]),
            "acc_i2t": i2t,
            "acc_t2i": t2i,
            "logit_scale": float(unwrap(self.model).logit_scale.detach().exp()),
            "pairs": out["pairs"],
        }

    def __call__(self, micro_batches: list) -> dict:
        cfg, model = self.cfg, self.model
        dev = cfg.device
        moved = [
            (im.to(dev, non_blocking=True), tok.to(dev, non_blocking=True), tid.to(dev))
            for im, tok, tid, _ in micro_batches
        ]
        self.optimizer.zero_grad(set_to_none=True)
        all_ids = torch.cat([self._gather(tid, False) for _, _, tid in moved])
        twins = twin_mask(all_ids, cfg.same_text)
        if len(moved) == 1:
            images, tokens, _ = moved[0]
            with self._autocast():
                img_f, txt_f, scale = model(images, tokens, cfg.mask_ratio)
                loss, logits = clip_loss(self._gather(img_f, True), self._gather(txt_f, True), scale.mean(), twins)
            self._note(loss)
            self._backward(loss)
        else:
            cached_img, cached_txt = [], []
            with torch.no_grad(), self._autocast():
                for images, tokens, _ in moved:
                    img_f, txt_f, _ = model(images, tokens)
                    cached_img.append(self._gather(img_f, False))
                    cached_txt.append(self._gather(txt_f, False))
            for j, (images, tokens, _) in enumerate(moved):
                last = j == len(moved) - 1
                sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with self._autocast():
                        img_f, txt_f, scale = model(images, tokens, cfg.mask_ratio)
                        img_all = torch.cat(cached_img[:j] + [self._gather(img_f, True)] + cached_img[j + 1 :])
                        txt_all = torch.cat(cached_txt[:j] + [self._gather(txt_f, True)] + cached_txt[j + 1 :])
                        loss, logits = clip_loss(img_all, txt_all, scale.mean(), twins)
                    self._note(loss)
                    self._backward(loss)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        m = unwrap(model)
        with torch.no_grad():
            m.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        # tensors, not floats: reading them waits for the device (see read)
        return {"loss": loss.detach(), "logits": logits.detach(), "twins": twins, "pairs": len(all_ids)}


@torch.no_grad()
def contrastive_eval(model: nn.Module, loader, *, device, precision: str = "fp32", same_text: bool = True) -> dict:
    """Validation contrastive loss and in-batch accuracy (cn_clip's), averaged over pairs."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    total = acc_i = acc_t = 0.0
    n = 0
    try:
        for batch in loader:
            if batch is None:
                continue
            images, tokens, tids, _ = batch
            with autocast_context(device, precision):
                img_f, txt_f, scale = m(images.to(device), tokens.to(device))
                twins = twin_mask(tids.to(device), same_text)
                loss, logits = clip_loss(img_f, txt_f, scale, twins)
            b = len(images)
            i2t, t2i = batch_accuracy(logits, twins)
            total += float(loss) * b
            acc_i += i2t * b
            acc_t += t2i * b
            n += b
    finally:
        m.train(was_training)
    if n == 0:
        return {}
    return {"val_loss": total / n, "val_acc_i2t": 100.0 * acc_i / n, "val_acc_t2i": 100.0 * acc_t / n}

"""Reference computations the tests compare the package with (test-only code)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from solution.data.datasets import PairCollate, PairDataset, eval_transform
from solution.training.loaders import epoch_order
from solution.training.step import batch_accuracy, clip_loss, twin_mask


@torch.no_grad()
def contrastive_eval(model, split, config, *, batch_size: int, seed: int, same_text: bool = True) -> dict:
    """cn_clip's validation loss and in-batch accuracies, averaged over pairs: the model run on each batch of the
    split's pairs in a fixed shuffled order (``seed``), pairs whose image does not decode left out."""
    order = epoch_order(split.num_samples, 1, seed, 0).tolist()
    batches = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    pairs = PairDataset(split, eval_transform(config.image_resolution))
    loader = DataLoader(pairs, batch_sampler=batches, collate_fn=PairCollate(config.context_length, config.text_prompt))
    model.eval()
    total = acc_i = acc_t = n = 0.0
    for images, tokens, text_ids, _ in filter(None, loader):
        image_features, text_features, scale = model(images, tokens)
        twins = twin_mask(text_ids, same_text)
        loss, logits = clip_loss(image_features, text_features, scale, twins)
        i2t, t2i = batch_accuracy(logits, twins)
        b = len(images)
        total, acc_i, acc_t, n = total + float(loss) * b, acc_i + i2t * b, acc_t + t2i * b, n + b
    return {"val_loss": total / n, "val_acc_i2t": 100.0 * acc_i / n, "val_acc_t2i": 100.0 * acc_t / n}

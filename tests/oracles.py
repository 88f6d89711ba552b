"""Test-only reference code: exact float64 definitions, brute-force rankings, and probes of a model."""

from __future__ import annotations

import numpy as np
import torch
from cn_clip.clip.modeling_bert import BertSelfAttention
from torch.utils.data import DataLoader

from cn_clip_patch.attention import SdpaBertSelfAttention
from solution.data.datasets import PairCollate, PairDataset, eval_transform
from solution.retrieval.official import KEYS
from solution.training.loaders import epoch_order
from solution.training.step import batch_accuracy, clip_loss, twin_mask


def dyadic(rng, shape, top: int = 20, denom: int = 16) -> np.ndarray:
    """Features k/denom with |k| <= top: products and partial sums are exact in float32 while
    ``d * top**2 < 2**24``, so every kernel, chunking or accumulation order gives the same scores and ties."""
    return (rng.integers(-top, top + 1, shape) / denom).astype(np.float32)


def stable_topk(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, indices)`` of each row's top-k by a stable descending sort (ties to the lower index)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def ranked_ids(queries, gallery, gallery_ids, k: int) -> list[list[int]]:
    """The exact ranking of float64 inner products (exact on dyadic features), as gallery ids."""
    _, idx = stable_topk(np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T, k)
    return np.asarray(gallery_ids)[idx].tolist()


def normalise(s: np.ndarray, norm: str, temperature: float = 1.0) -> np.ndarray:
    """Per-row normalisation by definition: z-score (population std; constant rows, told by their range -> 0) or
    softmax(s / T)."""
    if norm == "zscore":
        const, std = np.ptp(s, axis=1, keepdims=True) == 0, s.std(axis=1, keepdims=True)
        return np.where(const, 0.0, (s - s.mean(axis=1, keepdims=True)) / np.where(const, 1, std))
    if norm == "softmax":
        e = np.exp(s / temperature)
        return e / e.sum(axis=1, keepdims=True)
    return s


def fused(members, weights, norm: str = "none", temperature: float = 1.0) -> np.ndarray:
    """``sum_m w_m N(q_m @ g_m.T) / sum_m w_m`` in float64, members given as ``(queries, gallery)`` pairs."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return sum(
        wm * normalise(np.asarray(q, np.float64) @ np.asarray(g, np.float64).T, norm, temperature)
        for (q, g), wm in zip(members, w)
    )


def dual_softmax(s: np.ndarray, bank: np.ndarray, temperature: float) -> np.ndarray:
    """``S * exp(S / T) / sum_b exp(B_b / T)`` (column sums over the bank)."""
    return s * np.exp(s / temperature) / np.exp(bank / temperature).sum(axis=0)


def qb_norm(s: np.ndarray, bank: np.ndarray, temperature: float, bank_topk: int | None = None) -> np.ndarray:
    """QB-Norm's reference procedure: the log inverted softmax; with ``bank_topk``, only rows whose top-1 is in
    the union of the bank rows' top-k are normalised, the others keep ``S``."""
    out = np.log(np.exp(s / temperature) / np.exp(bank / temperature).sum(axis=0))
    if bank_topk is None:
        return out
    active = set(stable_topk(bank, bank_topk)[1].flatten().tolist())
    gate = np.array([int(np.argmax(row)) in active for row in s])
    return np.where(gate[:, None], out, s)


def sdpa_enabled(model) -> bool:
    """True when every ``BertSelfAttention`` of the model runs on SDPA (False if it has none)."""
    mods = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    return bool(mods) and all(isinstance(m, SdpaBertSelfAttention) for m in mods)


def ops(fn) -> set[str]:
    """The names of the aten ops ``fn()`` runs (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def vision_reaches_sdpa(model, images: torch.Tensor, *, train: bool = False) -> bool:
    """Whether ``model.encode_image(images)`` calls SDPA (in training mode with a backward when ``train``);
    every module's training flag is restored and no ``.grad`` is written."""
    modes = {m: m.training for m in model.modules()}
    model.train(train)

    def run():
        with torch.set_grad_enabled(train):
            out = model.encode_image(images)
            params = [p for p in model.parameters() if p.requires_grad]
            if train and out.requires_grad and params:
                torch.autograd.grad(out.float().sum(), params, allow_unused=True)

    try:
        return "aten::scaled_dot_product_attention" in ops(run)
    finally:
        for m, mode in modes.items():
            m.training = mode


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


def random_case(rng, direction, n_queries, gallery=40):
    """Official-format gold and predictions of ``n_queries`` random queries (60% with a hit), in shuffled order."""
    qkey, gkey = KEYS[direction]
    qids = rng.choice(10_000, n_queries, replace=False).tolist()
    gids = rng.choice(10_000, gallery, replace=False).tolist()
    gold, pred = [], []
    for q in qids:
        answers = [int(x) for x in rng.choice(gids, int(rng.integers(1, 4)), replace=False)]
        ranked = [int(x) for x in rng.permutation(gids)[:10]]
        if rng.random() < 0.6:
            if answers[0] in ranked:
                ranked.remove(answers[0])
            ranked.insert(int(rng.integers(0, 10)), answers[0])
            ranked = ranked[:10]
        gold.append({qkey: q, gkey: answers})
        pred.append({qkey: q, gkey: ranked})
    order = rng.permutation(len(pred))  # submission order need not follow the gold
    return gold, [pred[i] for i in order]

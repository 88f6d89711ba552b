"""Image and text features, and scoring a model on an LMDB split by real retrieval.

``encode_images`` / ``encode_texts`` are the one path from a model to L2-normalised features:
training validation, the soup and the submission all go through them, so they can never
disagree about prompts, context length or preprocessing.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cn_clip_patch.prompt import token_lengths, tokenize

from .common import SolutionError, autocast_context
from .data import ImageDataset, eval_transform, image_collate
from .lmdb_io import LMDBSplit
from .metrics import t2i_recall
from .models import ModelConfig

log = logging.getLogger(__name__)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def encode_images(model, split: LMDBSplit | str, config: ModelConfig, *, image_ids: Sequence[int] | None = None,
                  batch_size: int = 64, num_workers: int = 0, device="cpu", precision: str = "fp32",
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids int64 [N], features float32 [N, D])`` for the images of a split, in key order."""
    ds = ImageDataset(split, eval_transform(config.image_resolution), image_ids)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=image_collate,
                        persistent_workers=False)
    was_training = model.training
    model.eval()
    ids, feats = [], []
    try:
        for batch in tqdm(loader, desc="images", unit="batch", disable=not progress):
            if batch is None:
                continue
            bid, images = batch
            with autocast_context(device, precision):
                f = model.encode_image(images.to(device, non_blocking=True))
            ids.append(bid.numpy())
            feats.append(_normalize(f).cpu().numpy())
    finally:
        model.train(was_training)
    if not ids:
        raise SolutionError(f"no decodable images in {getattr(ds.split, 'split_dir', split)}")
    return np.concatenate(ids).astype(np.int64), np.concatenate(feats).astype(np.float32)


@torch.inference_mode()
def encode_texts(model, texts: Sequence[str], config: ModelConfig, *, batch_size: int = 64, device="cpu",
                 precision: str = "fp32", progress: bool = False) -> np.ndarray:
    """Features ``[N, D]`` (input order) with the config's prompt and context length.

    Texts are sorted by token length and each batch is cut to its longest text: the same
    features as upstream's padding to ``context_length``, for a fraction of the compute.
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, config.model_info["embed_dim"]), np.float32)
    order = np.argsort(token_lengths(texts, config.context_length, config.text_prompt), kind="stable")
    out = np.zeros((len(texts), config.model_info["embed_dim"]), np.float32)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="texts", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            tokens = tokenize([texts[i] for i in idx], config.context_length, config.text_prompt)
            with autocast_context(device, precision):
                f = model.encode_text(tokens.to(device, non_blocking=True))
            out[idx] = _normalize(f).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def split_queries(split: LMDBSplit) -> tuple[list[int], list[str], dict[int, list[int]]]:
    """``(text_ids, texts, gold)`` of a split, from its pairs."""
    q = split.queries()
    if not q:
        raise SolutionError(f"{split.split_dir} has no texts to score")
    return list(q), [t for t, _ in q.values()], {tid: ids for tid, (_, ids) in q.items()}


def evaluate_split(model, split: LMDBSplit | str, config: ModelConfig, *, device="cpu", batch_size: int = 64,
                   num_workers: int = 0, precision: str = "fp32", progress: bool = False,
                   text_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Text->image R@1/5/10 and mean recall (percent) of ``model`` on a split's queries vs all its images.

    ``text_ids`` restricts the queries (e.g. the soup's selection half); the gallery stays whole.
    """
    split = split if isinstance(split, LMDBSplit) else LMDBSplit(split)
    tids, texts, gold = split_queries(split)
    if text_ids is not None:
        keep = set(int(t) for t in text_ids)
        sel = [i for i, t in enumerate(tids) if t in keep]
        tids, texts = [tids[i] for i in sel], [texts[i] for i in sel]
        gold = {t: gold[t] for t in tids}
    image_ids, image_feats = encode_images(model, split, config, batch_size=batch_size, num_workers=num_workers,
                                           device=device, precision=precision, progress=progress)
    text_feats = encode_texts(model, texts, config, batch_size=batch_size, device=device, precision=precision,
                              progress=progress)
    return t2i_recall(text_feats, image_feats, tids, image_ids, gold, device=device)

"""Image and text features, and scoring a model on an LMDB split by real retrieval.

``encode_images`` / ``encode_texts`` are the one path from a model to L2-normalised features, and ``score_parts``
(``encode_split`` + ``score_features``) the one way a model is scored on a split. :func:`prepare_inputs` decodes
a gallery and tokenises its queries once for scoring many models, with the same scores.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cn_clip_patch.prompt import token_lengths, tokenize
from solution.common import SolutionError, autocast_context
from solution.data.datasets import ImageDataset, eval_transform, image_collate
from solution.data.lmdb_io import LMDBSplit
from solution.formats.muge import MugeText
from solution.model import ModelConfig

from .metrics import KS, present_gold, query_hits, recall_from_hits, topk
from .pixels import PreparedImages, prepare_images

log = logging.getLogger(__name__)


def _normalize(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()


@contextlib.contextmanager
def _inference(model):
    """``model`` in eval mode without autograd for the block; its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def encode_images(
    model,
    split: LMDBSplit | str,
    config: ModelConfig,
    *,
    image_ids: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device="cpu",
    precision: str = "fp32",
    progress: bool = False,
    flip: bool = False,
    prepared: PreparedImages | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids int64 [N], features float32 [N, D])`` of a split's decodable images, in key order; ``flip``: of
    the mirrored images; ``prepared``: these ids decoded already (:func:`~.pixels.prepare_images`)."""
    if prepared is None:
        ds = ImageDataset(split, eval_transform(config.image_resolution), image_ids)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=image_collate)
    ids, feats = [], []
    with _inference(model):
        batches = prepared.batches(batch_size) if prepared else loader
        for batch in tqdm(batches, desc="images", unit="batch", disable=not progress):
            if batch is None:
                continue
            images = torch.flip(batch[1], dims=[-1]) if flip else batch[1]
            with autocast_context(device, precision):
                f = model.encode_image(images.to(device, non_blocking=True))
            ids.append(batch[0].numpy())
            feats.append(_normalize(f))
    if not ids:
        raise SolutionError(f"no decodable images in {getattr(split, 'split_dir', split)}")
    return np.concatenate(ids).astype(np.int64), np.concatenate(feats).astype(np.float32)


def token_batches(sorted_lengths: np.ndarray, order: np.ndarray, budget: int) -> list[np.ndarray]:
    """Split ``order`` (texts by ascending token length) into consecutive batches of at most ``budget`` padded
    tokens each (a longer text alone)."""
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end + 1 - start) * sorted_lengths[end] > budget:
            batches.append(order[start:end])
            start = end
    return batches


def text_batches(texts: Sequence[str], config: ModelConfig, batch_size: int = 64) -> list[tuple]:
    """:func:`encode_texts`'s batches: ``(indices into texts, token ids)`` by token length, each cut to its
    longest text and holding at most upstream's ``batch_size x context_length`` tokens."""
    texts = list(texts)
    lengths = np.asarray(token_lengths(texts, config.context_length, config.text_prompt)) if texts else np.zeros(0)
    order = np.argsort(lengths, kind="stable")
    plan = token_batches(lengths[order], order, batch_size * config.context_length)
    return [(idx, tokenize([texts[i] for i in idx], config.context_length, config.text_prompt)) for idx in plan]


def encode_texts(
    model,
    texts: Sequence[str],
    config: ModelConfig,
    *,
    batch_size: int = 64,
    device="cpu",
    precision: str = "fp32",
    progress: bool = False,
    batches: Sequence[tuple] | None = None,
) -> np.ndarray:
    """Features ``[N, D]`` (input order) with the config's prompt and context length, equal to upstream's
    padding to ``context_length``. ``batches``: :func:`text_batches` of these texts, tokenised already."""
    out = np.zeros((len(texts), config.model_info["embed_dim"]), np.float32)
    with _inference(model):
        batches = text_batches(texts, config, batch_size) if batches is None else batches
        for idx, tokens in tqdm(batches, desc="texts", unit="batch", disable=not progress):
            with autocast_context(device, precision):
                out[idx] = _normalize(model.encode_text(tokens.to(device, non_blocking=True)))
    return out


@dataclass(frozen=True)
class Queries:
    """Text queries in order: ``text_ids``, their ``texts`` and ``gold`` image ids by text id."""

    text_ids: list[int]
    texts: list[str]
    gold: dict[int, list[int]]


def split_queries(split: LMDBSplit) -> Queries:
    """The queries of a split, from its pairs (first-seen order)."""
    q = split.queries()
    if not q:
        raise SolutionError(f"{split.split_dir} has no texts to score")
    return Queries(list(q), [t for t, _ in q.values()], {tid: list(ids) for tid, (_, ids) in q.items()})


def text_queries(records: Sequence[MugeText]) -> Queries:
    """The queries of MUGE texts read with their gold (:func:`solution.formats.muge.read_texts`)."""
    return Queries(
        [r.text_id for r in records], [r.text for r in records], {r.text_id: list(r.image_ids) for r in records}
    )


@dataclass
class ScoringInputs:
    """A split's gallery decoded (None: decoded on each use) and its queries tokenised, once for many models."""

    images: PreparedImages | None
    texts: list


def prepare_inputs(split: LMDBSplit, config: ModelConfig, queries: Queries, *, batch_size: int = 64, **kw):
    """What :func:`score_parts` (called with the same ``batch_size``) needs of a split that no model changes;
    ``kw``: :func:`~.pixels.prepare_images`'s ``num_workers``, ``max_bytes``, ``progress``."""
    images = prepare_images(split, config, batch_size=batch_size, **kw)
    return ScoringInputs(images, text_batches(queries.texts, config, batch_size))


@dataclass
class SplitFeatures:
    """A model's features of a split: every decodable gallery image, every query (in ``Queries`` order)."""

    image_ids: np.ndarray  # int64 [N]
    image_feats: np.ndarray  # float32 [N, D], L2-normalised
    text_feats: np.ndarray  # float32 [Q, D], L2-normalised
    stored: int  # images in the split (decodable or not)


def encode_split(model, split: LMDBSplit, config: ModelConfig, queries: Queries, *, inputs=None, num_workers=0, **kw):
    """The gallery (all of the split's images) and the query texts through ``model``, once each; ``kw``:
    ``device``, ``batch_size``, ``precision``, ``progress``."""
    prepared = inputs.images if inputs else None
    image_ids, image_feats = encode_images(model, split, config, num_workers=num_workers, prepared=prepared, **kw)
    text_feats = encode_texts(model, queries.texts, config, batches=inputs.texts if inputs else None, **kw)
    return SplitFeatures(image_ids, image_feats, text_feats, len(split.image_ids()))


def score_features(feats: SplitFeatures, split, queries: Queries, parts: Mapping, *, device="cpu", with_hits=False):
    """:func:`score_parts` from features already computed (see there)."""
    undecodable = feats.stored - len(feats.image_ids)
    scored = present_gold(queries.gold, feats.image_ids.tolist())
    dropped = len(queries.gold) - len(scored)
    if undecodable or dropped:
        lost = sum(map(len, queries.gold.values())) - sum(map(len, scored.values()))
        log.warning(
            f"{split.split_dir}: {undecodable} of {feats.stored} images could not be decoded; {lost} gold ids "
            f"left out, {dropped} of {len(queries.gold)} queries without a decodable gold image not scored"
        )
    _, idx = topk(feats.text_feats, feats.image_feats, max(KS), device=device)
    ranked = dict(zip(queries.text_ids, feats.image_ids[idx].tolist()))
    out = {}
    for name, ids in parts.items():
        keep = set(ids)
        gold = {t: scored[t] for t in queries.text_ids if t in keep and t in scored}
        if not gold:
            raise SolutionError(f"{split.split_dir}: no query of the {name} part has a decodable gold image")
        hits = query_hits(ranked, gold)
        out[name] = {**recall_from_hits(hits), "undecodable_images": undecodable, "queries_scored": len(gold)}
        if with_hits:
            out[name].update(text_ids=list(gold), hits=hits)
    return out


def score_parts(
    model, split, config: ModelConfig, queries=None, parts=None, *, device="cpu", with_hits=False, inputs=None, **kw
):
    """Text->image R@1/5/10 and mean recall (percent) of ``model`` on ``parts`` (name -> text ids; default all) of
    the ``queries`` (default the split's) against the whole gallery. As the official evaluator sees what decodes,
    a gold image that does not is left out and a query left without one not scored. ``with_hits``: each part also
    holds its ``text_ids`` and ``hits`` ([Q, 3] bool). ``kw``: ``batch_size``, ``num_workers``, ``precision``."""
    split = split if isinstance(split, LMDBSplit) else LMDBSplit(split)
    queries = queries if queries is not None else split_queries(split)
    parts = parts if parts is not None else {"all": queries.text_ids}
    feats = encode_split(model, split, config, queries, inputs=inputs, device=device, **kw)
    return score_features(feats, split, queries, parts, device=device, with_hits=with_hits)


def evaluate_split(model, split: LMDBSplit | str, config: ModelConfig, *, text_ids=None, **kw) -> dict[str, float]:
    """:func:`score_parts` of the split's own queries (``text_ids`` when given) as one part: ``r1``/``r5``/``r10``/
    ``mean_recall`` (percent), ``undecodable_images`` and ``queries_scored``."""
    return score_parts(model, split, config, parts=None if text_ids is None else {"all": text_ids}, **kw)["all"]

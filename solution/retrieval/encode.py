"""Image and text features, and scoring a model on an LMDB split by real retrieval.

``encode_images`` / ``encode_texts`` are the one path from a model to L2-normalised features:
training validation, the soup, feature extraction and so the submission all go through them,
so they can never disagree about prompts, context length or preprocessing. ``score_parts`` (and
``evaluate_split``, its one-part form) is the one way a model is scored on a split: training
validation and the soup use it (``encode_split`` + ``score_features``, its two halves, let training
validation reuse the features for its loss). The image-feature cache is :mod:`.cache`. To score
many models on one split, :func:`prepare_inputs` decodes the gallery (:mod:`.prepared`) and
tokenises the queries once; given to ``score_parts``, the same scores follow.
"""

from __future__ import annotations

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

from .metrics import present_gold, query_hits, recall_at_k, t2i_rankings
from .pixels import IMAGE_CACHE_BYTES, PreparedImages, prepare_images

log = logging.getLogger(__name__)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
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
    """``(image_ids int64 [N], features float32 [N, D])`` for the images of a split, in key order.

    ``flip``: of the horizontally mirrored images (the preprocessed tensor flipped along its width),
    for flip test-time augmentation (:mod:`solution.ensembles.members`). ``prepared``: the images
    decoded once already (:func:`prepare_images`, of these ids at this resolution): no image is
    decoded, and the model sees the same tensors in the same batches as without it."""
    if prepared is not None:
        loader = prepared.batches(batch_size)
        ds = None
    else:
        ds = ImageDataset(split, eval_transform(config.image_resolution), image_ids)
        loader = DataLoader(
            ds, batch_size=batch_size, num_workers=num_workers, collate_fn=image_collate, persistent_workers=False
        )
    was_training = model.training
    model.eval()
    ids, feats = [], []
    try:
        for batch in tqdm(loader, desc="images", unit="batch", disable=not progress):
            if batch is None:
                continue
            bid, images = batch
            images = torch.flip(images, dims=[-1]) if flip else images
            with autocast_context(device, precision):
                f = model.encode_image(images.to(device, non_blocking=True))
            ids.append(bid.numpy())
            feats.append(_normalize(f).cpu().numpy())
    finally:
        model.train(was_training)
    if not ids:
        raise SolutionError(f"no decodable images in {getattr(getattr(ds, 'split', None), 'split_dir', split)}")
    return np.concatenate(ids).astype(np.int64), np.concatenate(feats).astype(np.float32)


def token_batches(sorted_lengths: np.ndarray, order: np.ndarray, budget: int, overhead: int = 1024) -> list[np.ndarray]:
    """Split ``order`` (texts by ascending token length) into batches of at most ``budget`` padded tokens.

    Minimises padded tokens + ``overhead`` per batch by dynamic programming over the runs of equal
    length (at most ``context_length`` of them). Measured on CPU (RoBERTa-base), a batch costs about
    as much as a thousand padded tokens more: few large batches beat many exact-length ones.
    """
    if len(order) == 0:
        return []
    lengths, starts, counts = np.unique(np.asarray(sorted_lengths), return_index=True, return_counts=True)
    batches, groups = [], []  # groups: (length, start, count); a run over the budget gives full batches first
    for length, start, count in zip(lengths.tolist(), starts.tolist(), counts.tolist()):
        cap = max(1, budget // length)
        while count > cap:
            batches.append(order[start : start + cap])
            start, count = start + cap, count - cap
        groups.append((length, start, count))
    best, first = [0.0] + [float("inf")] * len(groups), [0] * (len(groups) + 1)
    for j in range(1, len(groups) + 1):  # best[j]: cost of groups[:j]; a batch = groups[i-1:j]
        texts = 0
        for i in range(j, 0, -1):
            texts += groups[i - 1][2]
            if texts * groups[j - 1][0] > budget and i < j:
                break
            cost = best[i - 1] + texts * groups[j - 1][0] + overhead
            if cost < best[j]:
                best[j], first[j] = cost, i
    spans, j = [], len(groups)
    while j > 0:
        spans.append((first[j], j))
        j = first[j] - 1
    for i, j in reversed(spans):
        batches.append(np.concatenate([order[st : st + c] for _, st, c in groups[i - 1 : j]]))
    return batches


def _token_plan(texts: list[str], config: ModelConfig, batch_size: int) -> list[np.ndarray]:
    lengths = np.asarray(token_lengths(texts, config.context_length, config.text_prompt))
    order = np.argsort(lengths, kind="stable")
    return token_batches(lengths[order], order, batch_size * config.context_length)


def _tokens(texts: list[str], idx: np.ndarray, config: ModelConfig) -> torch.Tensor:
    return tokenize([texts[i] for i in idx], config.context_length, config.text_prompt)


def text_batches(
    texts: Sequence[str], config: ModelConfig, batch_size: int = 64
) -> list[tuple[np.ndarray, torch.Tensor]]:
    """:func:`encode_texts`'s batches: ``(indices into texts, token ids)``, by token length, each cut to
    its longest text (tokenise once, encode with many models: ``encode_texts(batches=...)``)."""
    texts = list(texts)
    return [(idx, _tokens(texts, idx, config)) for idx in _token_plan(texts, config, batch_size)] if texts else []


@torch.inference_mode()
def encode_texts(
    model,
    texts: Sequence[str],
    config: ModelConfig,
    *,
    batch_size: int = 64,
    device="cpu",
    precision: str = "fp32",
    progress: bool = False,
    batches: Sequence[tuple[np.ndarray, torch.Tensor]] | None = None,
) -> np.ndarray:
    """Features ``[N, D]`` (input order) with the config's prompt and context length.

    Texts are sorted by token length and each batch is cut to its longest text: the same
    features as upstream's padding to ``context_length``, for a fraction of the compute.
    A batch holds as many texts as fit in upstream's batch of ``batch_size`` x ``context_length``
    tokens (so never more memory than upstream's batch, and larger, more efficient products).
    ``batches``: :func:`text_batches` of these texts, tokenised already.
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, config.model_info["embed_dim"]), np.float32)
    if batches is None:  # tokenised batch by batch
        plan = _token_plan(texts, config, batch_size)
        batches = ((idx, _tokens(texts, idx, config)) for idx in plan)
    else:
        plan = batches
    out = np.zeros((len(texts), config.model_info["embed_dim"]), np.float32)
    was_training = model.training
    model.eval()
    try:
        for idx, tokens in tqdm(batches, desc="texts", unit="batch", total=len(plan), disable=not progress):
            with autocast_context(device, precision):
                f = model.encode_text(tokens.to(device, non_blocking=True))
            out[idx] = _normalize(f).cpu().numpy()
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class Queries:
    """Text queries in order: ``text_ids``, their ``texts`` and ``gold`` image ids by text id."""

    text_ids: list[int]
    texts: list[str]
    gold: dict[int, list[int]]

    def subset(self, text_ids: Sequence[int]) -> Queries:
        """The queries among ``text_ids``, in this set's order."""
        keep = {int(t) for t in text_ids}
        sel = [i for i, t in enumerate(self.text_ids) if t in keep]
        ids = [self.text_ids[i] for i in sel]
        return Queries(ids, [self.texts[i] for i in sel], {t: self.gold[t] for t in ids})


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


def _warn_undecodable(
    split: LMDBSplit, gold: Mapping[int, list[int]], scored: Mapping, stored: int, undecodable: int
) -> None:
    dropped = len(gold) - len(scored)
    if undecodable or dropped:
        lost = sum(len(v) for v in gold.values()) - sum(len(v) for v in scored.values())
        log.warning(
            "%s: %d of %d images could not be decoded; %d gold ids left out, %d of %d queries without a "
            "decodable gold image not scored",
            split.split_dir,
            undecodable,
            stored,
            lost,
            dropped,
            len(gold),
        )


@dataclass
class ScoringInputs:
    """A split's gallery decoded (:func:`prepare_images`; None: decoded on each use) and its query texts
    tokenised (:func:`text_batches`) once, for scoring many models: :func:`prepare_inputs`."""

    images: PreparedImages | None
    texts: list


def prepare_inputs(
    split: LMDBSplit,
    config: ModelConfig,
    queries: Queries,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    max_bytes: int = IMAGE_CACHE_BYTES,
    progress: bool = False,
) -> ScoringInputs:
    """What :func:`score_parts` needs of a split that no model changes, prepared once (``batch_size``: the
    one it will be called with)."""
    return ScoringInputs(
        prepare_images(
            split, config, batch_size=batch_size, num_workers=num_workers, max_bytes=max_bytes, progress=progress
        ),
        text_batches(queries.texts, config, batch_size),
    )


@dataclass
class SplitFeatures:
    """A model's features of a split: every decodable gallery image, every query (in ``Queries`` order)."""

    image_ids: np.ndarray  # int64 [N]
    image_feats: np.ndarray  # float32 [N, D], L2-normalised
    text_feats: np.ndarray  # float32 [Q, D], L2-normalised
    stored: int  # images in the split (decodable or not)


def encode_split(
    model,
    split: LMDBSplit,
    config: ModelConfig,
    queries: Queries,
    *,
    inputs: ScoringInputs | None = None,
    device="cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> SplitFeatures:
    """The gallery (all of the split's images) and the query texts through ``model``, once each."""
    kw = dict(batch_size=batch_size, device=device, precision=precision, progress=progress)
    stored = len(split.image_ids())
    image_ids, image_feats = encode_images(
        model, split, config, num_workers=num_workers, prepared=inputs.images if inputs else None, **kw
    )
    text_feats = encode_texts(model, queries.texts, config, batches=inputs.texts if inputs else None, **kw)
    return SplitFeatures(image_ids, image_feats, text_feats, stored)


def score_features(
    feats: SplitFeatures,
    split: LMDBSplit,
    queries: Queries,
    parts: Mapping[str, Sequence[int]],
    *,
    device="cpu",
    with_hits: bool = False,
) -> dict[str, dict]:
    """:func:`score_parts` from features already computed (see there)."""
    undecodable = feats.stored - len(feats.image_ids)
    scored = present_gold(queries.gold, feats.image_ids.tolist())
    _warn_undecodable(split, queries.gold, scored, feats.stored, undecodable)
    if not scored:
        raise SolutionError(f"{split.split_dir}: no query has a decodable gold image; nothing to score")
    ranked = t2i_rankings(feats.text_feats, feats.image_feats, queries.text_ids, feats.image_ids, device=device)
    out = {}
    for name, ids in parts.items():
        gold = {t: scored[t] for t in queries.subset(ids).text_ids if t in scored}
        if not gold:
            raise SolutionError(f"{split.split_dir}: no query of the {name} part has a decodable gold image")
        out[name] = {**recall_at_k(ranked, gold), "undecodable_images": undecodable, "queries_scored": len(gold)}
        if with_hits:
            out[name].update(text_ids=list(gold), hits=query_hits(ranked, gold))
    return out


def score_parts(
    model,
    split: LMDBSplit | str,
    config: ModelConfig,
    queries: Queries | None = None,
    parts: Mapping[str, Sequence[int]] | None = None,
    *,
    device="cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
    with_hits: bool = False,
    inputs: ScoringInputs | None = None,
) -> dict[str, dict]:
    """Text->image R@1/5/10 and mean recall (percent) of ``model`` on ``parts`` of the queries vs all images.

    ``queries`` default to the split's pairs; ``parts`` (name -> text ids, default ``{"all": every
    query}``) select queries, the gallery stays whole. The gallery and every query text are
    encoded once. Scored as the official evaluator would see the gallery that decodes: gold images
    that could not be decoded are left out of the gold sets and a query left without any is not
    scored (never counted as a miss); each part's ``queries_scored`` and ``undecodable_images`` say
    how many. ``with_hits``: each part also carries ``text_ids`` (the queries scored, in order) and
    ``hits`` (``[Q, 3]`` bool, :func:`solution.retrieval.metrics.query_hits` of the same rankings).
    ``inputs``: :func:`prepare_inputs` of this split, queries and ``batch_size`` (no image decoded,
    no text tokenised here; the same scores).
    """
    split = split if isinstance(split, LMDBSplit) else LMDBSplit(split)
    queries = queries if queries is not None else split_queries(split)
    parts = parts if parts is not None else {"all": queries.text_ids}
    feats = encode_split(
        model,
        split,
        config,
        queries,
        inputs=inputs,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        progress=progress,
    )
    return score_features(feats, split, queries, parts, device=device, with_hits=with_hits)


def evaluate_split(
    model,
    split: LMDBSplit | str,
    config: ModelConfig,
    *,
    device="cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
    text_ids: Sequence[int] | None = None,
    with_hits: bool = False,
) -> dict[str, float]:
    """:func:`score_parts` of the split's own queries (only ``text_ids`` when given) as one part:
    ``r1``/``r5``/``r10``/``mean_recall`` (percent), ``undecodable_images`` and ``queries_scored``."""
    split = split if isinstance(split, LMDBSplit) else LMDBSplit(split)
    queries = split_queries(split)
    if text_ids is not None:
        queries = queries.subset(text_ids)
    return score_parts(
        model,
        split,
        config,
        queries,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        progress=progress,
        with_hits=with_hits,
    )["all"]

"""The one path from a model to L2-normalised image and text features, and the one way a model is scored on an
LMDB split by real retrieval (:func:`score_parts`); :func:`prepare_inputs` decodes a gallery and tokenises its
queries once for scoring many models, with the same scores. :class:`ValData`: validation queries and the draw."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cn_clip_patch.prompt import token_lengths, tokenize
from solution.common import SolutionError
from solution.data.datasets import ImageDataset, eval_transform, image_collate
from solution.data.lmdb_io import LMDBSplit
from solution.formats.muge import read_texts
from solution.model import ModelConfig
from solution.model.precision import autocast as autocast_context

from .metrics import KS, present_gold, query_hits, recall_from_hits
from .rank import topk

log = logging.getLogger(__name__)


IMAGE_CACHE_BYTES = 8 << 30  # default bound of prepared pixels (MUGE's 29,806 valid images at 224 px: 4.2 GiB)


def _uint8_chw(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()


@dataclass
class PreparedImages:
    """Images of a split decoded and resized once (:func:`prepare_images`), kept as uint8 pixels."""

    image_ids: np.ndarray  # int64 [K]: the decodable ones, in the requested order
    positions: np.ndarray  # int64 [K]: each one's index among the requested ids
    pixels: torch.Tensor  # uint8 [K, 3, H, W]
    finish: Callable  # uint8 batch -> the model's input (what ToTensor + Normalize give)
    requested: int  # ids requested (decodable or not)

    def batches(self, batch_size: int):
        """``(ids, images)`` as :func:`~.encode.encode_images`'s loader gives them (undecodable ones left out)."""
        for lo in range(0, self.requested, batch_size):
            a, b = np.searchsorted(self.positions, [lo, lo + batch_size])
            if a < b:
                yield torch.from_numpy(self.image_ids[a:b]), self.finish(self.pixels[a:b])


def prepare_images(
    split, config: ModelConfig, *, batch_size=64, num_workers=0, max_bytes=IMAGE_CACHE_BYTES, progress=False
) -> PreparedImages | None:
    """A split's images decoded and resized once for every model of ``config``'s resolution; None (decode on
    each use) above ``max_bytes`` of pixels or when the eval transform does not end in ToTensor + Normalize."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    split = split if isinstance(split, LMDBSplit) else LMDBSplit(split, need_pairs=False)
    ids = split.image_ids()
    res = config.image_resolution
    steps = list(getattr(eval_transform(res), "transforms", []))
    need = len(ids) * 3 * res * res
    if [type(s) for s in steps[-2:]] != [ToTensor, Normalize] or need > max_bytes:
        log.info(f"{split.split_dir}: images decoded on each use ({need / 2**30:.1f} GiB of pixels)")
        return None
    ds = ImageDataset(split, Compose([*steps[:-2], _uint8_chw]), ids)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=image_collate)
    pix, got = torch.empty((len(ids), 3, res, res), dtype=torch.uint8), []
    for batch in tqdm(loader, desc="decode", unit="batch", disable=not progress):
        if batch is not None:
            pix[len(got) : len(got) + len(batch[0])] = batch[1]
            got.extend(batch[0].tolist())
    where = {int(i): p for p, i in enumerate(ids)}
    pix = pix if len(got) == len(ids) else pix[: len(got)].clone()
    normalize = steps[-1]
    finish = lambda x: normalize(x.to(torch.float32).div(255))  # noqa: E731  (ToTensor + Normalize, batched)
    return PreparedImages(
        np.asarray(got, np.int64), np.asarray([where[i] for i in got], np.int64), pix, finish, len(ids)
    )


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
    the mirrored images; ``prepared``: these ids decoded already (:func:`prepare_images`)."""
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


@dataclass
class ScoringInputs:
    """A split's gallery decoded (None: decoded on each use) and its queries tokenised, once for many models."""

    images: PreparedImages | None
    texts: list


def prepare_inputs(split: LMDBSplit, config: ModelConfig, queries: Queries, *, batch_size: int = 64, **kw):
    """What :func:`score_parts` (called with the same ``batch_size``) needs of a split that no model changes;
    ``kw``: :func:`prepare_images`'s ``num_workers``, ``max_bytes``, ``progress``."""
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


def draw_selection(text_ids, fraction: float | None, seed: int) -> tuple[list[int], list[int]]:
    """``(select, report)``: a random ``fraction`` of the queries and the rest (all and none without one)."""
    tids = list(text_ids)
    if not fraction:
        return tids, []
    if not 0 < fraction < 1 or len(tids) < 2:
        raise SolutionError(f"--select-split must be a fraction in (0, 1) of at least 2 queries, got {fraction}")
    perm = tids[:]
    random.Random(seed).shuffle(perm)
    chosen = set(perm[: min(max(1, round(fraction * len(tids))), len(tids) - 1)])
    return [t for t in tids if t in chosen], [t for t in tids if t not in chosen]


class ValData:
    """Validation queries (from ``--val-texts`` or the LMDB pairs) and the selection/report split."""

    def __init__(self, split_dir: str, texts_path: str | None, select_split: float | None, seed: int):
        split_dir = Path(split_dir)
        if not split_dir.exists():
            raise SolutionError(f"validation data not found: {split_dir}")
        if texts_path:
            self.split = LMDBSplit(split_dir, need_pairs=False)
            rs = read_texts(texts_path, need_gold=True, what="validation texts")
            self.queries = Queries(
                [r.text_id for r in rs], [r.text for r in rs], {r.text_id: list(r.image_ids) for r in rs}
            )
        elif not (split_dir / "pairs" / "data.mdb").is_file():
            raise SolutionError(f"validation data {split_dir} has no texts (no pairs LMDB): pass --val-texts")
        else:
            self.split = LMDBSplit(split_dir)
            self.queries = split_queries(self.split)
        q, gallery = self.queries, set(self.split.image_ids())
        missing = sum(i not in gallery for gold in q.gold.values() for i in gold)
        if missing:
            log.warning(
                f"validation: {missing} gold image ids are not in {split_dir} (a query without any: not scored)"
            )
        self.select, self.report = draw_selection(q.text_ids, select_split, seed)
        h = hashlib.blake2b(self.split.images_digest().encode(), digest_size=16)
        queries = [(q.texts[i], q.gold[t]) for i, t in enumerate(q.text_ids)]
        h.update(json.dumps([self.select, self.report, queries], ensure_ascii=False).encode())
        self.key = h.hexdigest()
        log.info(f"validation: {len(q.text_ids)} queries ({len(self.select)} select), {self.split.num_images} images")

    def parts(self) -> dict[str, list[int]]:
        """The query parts scored: the selection, and with a draw also the report part and all queries."""
        if not self.report:
            return {"select": self.select}
        return {"select": self.select, "report": self.report, "all": self.select + self.report}

"""Image and text features, and scoring a model on an LMDB split by real retrieval.

``encode_images`` / ``encode_texts`` are the one path from a model to L2-normalised features:
training validation, the soup and the submission all go through them, so they can never
disagree about prompts, context length or preprocessing.

CLI (``bash Chinese-CLIP/feature_extract.sh``, ``python -m solution.features``): cn_clip's
``eval/extract_features.py`` flags on CPU or GPU. Architecture, prompt and context length come
from the checkpoint's stored config (flags override with a warning).

Feature files (``BASE.npy`` + ``BASE.ids.npy`` + ``BASE.meta.json``, or cn_clip JSONL) are
written and read by :mod:`solution.feature_files`. Every input is read and every output checked
before the model loads (an output that is an input, a folder, under a file, or both the image and
the text output is refused with one line), so a bad command writes nothing.

Image features are cached in ``--cache-dir`` (default ``$SOLUTION_CACHE_DIR`` or
``~/.cache/cnclip-solution/image_feats``) under a key made of the vision tower's weights (all an
image feature depends on), the image LMDB's content (every key and value), the resolution and the
effective precision/device type: a second run against the same gallery reads the cache.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cn_clip_patch.prompt import PromptError, check_prompt, token_lengths, tokenize

from solution.common import SolutionError, autocast_context, read_jsonl, resolve_device, run_cli
from solution.data.datasets import ImageDataset, eval_transform, image_collate
from solution.formats.features import (FORMATS, check_outputs, checkpoint_validation, feature_paths, file_sha256, is_int,
                            save_features)
from solution.data.lmdb_io import LMDBSplit
from .metrics import present_gold, t2i_recall
from solution.model.models import ModelConfig, load_model, state_dict_digest

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
            batches.append(order[start:start + cap])
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
        batches.append(np.concatenate([order[st:st + c] for _, st, c in groups[i - 1:j]]))
    return batches


@torch.inference_mode()
def encode_texts(model, texts: Sequence[str], config: ModelConfig, *, batch_size: int = 64, device="cpu",
                 precision: str = "fp32", progress: bool = False) -> np.ndarray:
    """Features ``[N, D]`` (input order) with the config's prompt and context length.

    Texts are sorted by token length and each batch is cut to its longest text: the same
    features as upstream's padding to ``context_length``, for a fraction of the compute.
    A batch holds as many texts as fit in upstream's batch of ``batch_size`` x ``context_length``
    tokens (so never more memory than upstream's batch, and larger, more efficient products).
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, config.model_info["embed_dim"]), np.float32)
    lengths = np.asarray(token_lengths(texts, config.context_length, config.text_prompt))
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(texts), config.model_info["embed_dim"]), np.float32)
    was_training = model.training
    model.eval()
    try:
        for idx in tqdm(token_batches(lengths[order], order, batch_size * config.context_length), desc="texts",
                        unit="batch", disable=not progress):
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
    Scored as the official evaluator would see the gallery that decodes: gold images that could
    not be decoded are left out of the gold sets and a query left without any is not scored
    (never counted as a miss); ``undecodable_images`` and ``queries_scored`` say how many.
    """
    split = split if isinstance(split, LMDBSplit) else LMDBSplit(split)
    tids, texts, gold = split_queries(split)
    if text_ids is not None:
        keep = set(int(t) for t in text_ids)
        sel = [i for i, t in enumerate(tids) if t in keep]
        tids, texts = [tids[i] for i in sel], [texts[i] for i in sel]
        gold = {t: gold[t] for t in tids}
    stored = len(split.image_ids())
    image_ids, image_feats = encode_images(model, split, config, batch_size=batch_size, num_workers=num_workers,
                                           device=device, precision=precision, progress=progress)
    scored = present_gold(gold, image_ids.tolist())
    undecodable, dropped = stored - len(image_ids), len(gold) - len(scored)
    if undecodable or dropped:
        lost = sum(len(v) for v in gold.values()) - sum(len(v) for v in scored.values())
        log.warning("%s: %d of %d images could not be decoded; %d gold ids left out, %d of %d queries without a "
                    "decodable gold image not scored", split.split_dir, undecodable, stored, lost, dropped, len(gold))
    if not scored:
        raise SolutionError(f"{split.split_dir}: no query has a decodable gold image; nothing to score")
    text_feats = encode_texts(model, texts, config, batch_size=batch_size, device=device, precision=precision,
                              progress=progress)
    return {**t2i_recall(text_feats, image_feats, tids, image_ids, scored, device=device),
            "undecodable_images": undecodable, "queries_scored": len(scored)}


# ---------------------------------------------------------------- provenance and the image cache

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("SOLUTION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cnclip-solution" / "image_feats"


def effective_precision(device, precision: str) -> str:
    """What a precision flag computes in on a device: CPU runs fp32 unless bf16 is asked for."""
    device = torch.device(device)
    if device.type == "cuda":
        return "fp16" if precision in ("amp", "fp16") else precision
    return "bf16" if precision == "bf16" else "fp32"


def image_cache_key(model, config: ModelConfig, split: LMDBSplit, device, precision: str) -> tuple[str, dict]:
    parts = {
        "version": CACHE_VERSION,
        "visual_sha256": state_dict_digest(model.visual.state_dict()),
        "vision_info": {k: v for k, v in config.model_info.items() if not k.startswith("text_") and k != "vocab_size"},
        "images_sha256": split.images_digest(),
        "precision": effective_precision(device, precision),
        "device_type": torch.device(device).type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40], parts


def cached_image_features(model, split: LMDBSplit, config: ModelConfig, *, cache_dir: str | os.PathLike | None,
                          device, precision: str, **encode_kw) -> tuple[np.ndarray, np.ndarray, dict]:
    """``encode_images`` through the cache: ``(ids, feats, info)`` with ``info["cache"]`` hit|miss|off."""
    if cache_dir is None:
        ids, feats = encode_images(model, split, config, device=device, precision=precision, **encode_kw)
        return ids, feats, {"cache": "off"}
    t0 = time.perf_counter()
    key, parts = image_cache_key(model, config, split, device, precision)
    log.info("image cache key %s (%.1f s to hash weights and images)", key[:12], time.perf_counter() - t0)
    stem = Path(cache_dir) / f"img_{key}"
    fpath, ipath, mpath = feature_paths(str(stem) + ".npy")
    info = {"cache": "miss", "cache_key": key, "images_sha256": parts["images_sha256"], "cache_file": str(fpath)}
    if fpath.is_file() and ipath.is_file():
        try:
            ids, feats = np.load(ipath, allow_pickle=False), np.load(fpath, allow_pickle=False)
            if ids.ndim == 1 and feats.ndim == 2 and len(ids) == len(feats):
                log.info("image features from the cache (%d images): %s", len(ids), fpath)
                return ids.astype(np.int64), feats.astype(np.float32), {**info, "cache": "hit"}
        except (ValueError, OSError):
            pass
        log.warning("unreadable cache entry %s; re-encoding", fpath)
    ids, feats = encode_images(model, split, config, device=device, precision=precision, **encode_kw)
    save_features(str(stem) + ".npy", "image", ids, feats, fmt="npy",
                  meta={"cache_key_parts": parts, "split_dir": str(split.split_dir)})
    return ids, feats, info


# ---------------------------------------------------------------- CLI


def _read_texts(path: str) -> tuple[list[int], list[str]]:
    ids, texts = [], []
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict) or "text_id" not in row or "text" not in row:
            raise SolutionError(f"{path}: record {n} lacks text_id or text")
        if not is_int(row["text_id"]):
            raise SolutionError(f"{path}: record {n}: text_id {row['text_id']!r} is not an integer")
        ids.append(row["text_id"])
        texts.append(str(row["text"]))
    if not ids:
        raise SolutionError(f"{path} holds no texts")
    if len(set(ids)) != len(ids):
        raise SolutionError(f"{path}: text_ids repeat (e.g. {next(i for i in ids if ids.count(i) > 1)})")
    return ids, texts


def default_outputs(args) -> tuple[str, str]:
    """cn_clip's default output names, with the format's extension."""
    ext = "npy" if args.format == "npy" else "jsonl"
    text_base = args.text_data[:-6] if args.text_data.endswith(".jsonl") else args.text_data
    text_out = args.text_feat_output_path or f"{text_base}.txt_feat.{ext}"
    image_out = args.image_feat_output_path or "{}.img_feat.{}".format(args.text_data.replace("_texts.jsonl", "_imgs"), ext)
    return text_out, image_out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.features", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    up = p.add_argument_group("cn_clip extract_features.py flags")
    up.add_argument("--extract-image-feats", action="store_true")
    up.add_argument("--extract-text-feats", action="store_true")
    up.add_argument("--image-data", default="../Multimodal_Retrieval/lmdb/test/imgs",
                    help="image LMDB (SPLIT/imgs or the split directory)")
    up.add_argument("--text-data", default="../Multimodal_Retrieval/test_texts.jsonl",
                    help="texts jsonl: {\"text_id\": int, \"text\": str} per line")
    up.add_argument("--image-feat-output-path", default=None,
                    help="default: TEXT_DATA with _texts.jsonl -> _imgs.img_feat.{npy|jsonl}")
    up.add_argument("--text-feat-output-path", default=None, help="default: TEXT_DATA minus .jsonl + .txt_feat.{npy|jsonl}")
    up.add_argument("--img-batch-size", type=int, default=64)
    up.add_argument("--text-batch-size", type=int, default=64)
    up.add_argument("--context-length", type=int, default=None, help="default: the checkpoint's (52 if unknown)")
    up.add_argument("--resume", required=True, help="checkpoint (ours, cn_clip's or an official one)")
    up.add_argument("--precision", choices=["amp", "fp16", "fp32", "bf16"], default="amp",
                    help="amp/fp16: fp16 autocast on GPU, fp32 on CPU; bf16 autocast on either")
    up.add_argument("--vision-model", default=None, help="default: the checkpoint's (or inferred from shapes)")
    up.add_argument("--text-model", default=None, help="default: the checkpoint's (or inferred from shapes)")
    up.add_argument("--debug", action="store_true", help="debug logging")
    ours = p.add_argument_group("ours")
    ours.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    ours.add_argument("--format", choices=FORMATS, default="npy", help="npy (+ .ids.npy) or cn_clip's jsonl")
    ours.add_argument("--prompt", default=None, help="text prompt; default: the checkpoint's")
    ours.add_argument("--cache-dir", default=None, help="image feature cache (default $SOLUTION_CACHE_DIR or "
                      "~/.cache/cnclip-solution/image_feats)")
    ours.add_argument("--no-cache", action="store_true", help="neither read nor write the image cache")
    ours.add_argument("--num-workers", type=int, default=None,
                      help="image decoding workers (default min(4, CPUs - 1))")
    ours.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    if not (args.extract_image_feats or args.extract_text_feats):
        raise SolutionError("nothing to do: pass --extract-image-feats and/or --extract-text-feats")
    for flag in ("img_batch_size", "text_batch_size"):
        if getattr(args, flag) < 1:
            raise SolutionError(f"--{flag.replace('_', '-')} must be at least 1")
    device = resolve_device(args.device)
    precision = effective_precision(device, args.precision)
    workers = args.num_workers if args.num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    progress = not args.no_progress
    text_out, image_out = default_outputs(args)
    # Every input read and every output checked before the model loads: a bad one writes nothing.
    ids, texts = _read_texts(args.text_data) if args.extract_text_feats else (None, None)
    split = LMDBSplit(args.image_data, need_pairs=False) if args.extract_image_feats else None
    inputs = [args.resume, args.text_data if texts else None,
              *((split.split_dir / "imgs" / f for f in ("data.mdb", "lock.mdb")) if split else ())]
    check_outputs({**({"--text-feat-output-path": text_out} if texts else {}),
                   **({"--image-feat-output-path": image_out} if split else {})}, args.format, inputs)

    t0 = time.perf_counter()
    model, config, ckpt = load_model(args.resume, device=device, vision_model=args.vision_model,
                                     text_model=args.text_model, context_length=args.context_length,
                                     text_prompt=args.prompt)
    try:
        check_prompt(config.text_prompt, config.context_length)
    except PromptError as e:
        raise SolutionError(str(e)) from None
    model.eval()
    log.info("loaded %s (%s, context %d, prompt %r) on %s, %s, in %.1f s", args.resume, config.arch,
             config.context_length, config.text_prompt, device, precision, time.perf_counter() - t0)
    provenance = {
        "checkpoint": str(Path(args.resume).resolve()),
        "checkpoint_sha256": file_sha256(args.resume),
        "config": config.to_dict(),
        "prompt": config.text_prompt,
        "context_length": config.context_length,
        "precision": precision,
        "device": str(device),
        "validation": checkpoint_validation(args.resume, ckpt),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    result: dict = {}
    if args.extract_text_feats:
        t0, c0 = time.perf_counter(), time.process_time()
        feats = encode_texts(model, texts, config, batch_size=args.text_batch_size, device=device,
                             precision=precision, progress=progress)
        paths = save_features(text_out, "text", ids, feats, fmt=args.format,
                              meta={**provenance, "data": str(Path(args.text_data).resolve())})
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        log.info("%d text features in %.1f s (%.1f texts/s) -> %s", len(ids), secs, len(ids) / max(secs, 1e-9), paths[0])
        result["text"] = {"path": str(paths[0]), "count": len(ids), "seconds": secs, "cpu_seconds": cpu}
    if split is not None:
        cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
        t0 = time.perf_counter()
        ids, feats, info = cached_image_features(model, split, config, cache_dir=cache_dir, device=device,
                                                 precision=precision, batch_size=args.img_batch_size,
                                                 num_workers=workers, progress=progress)
        if len(ids) < split.num_images:
            log.warning("%d of %d images could not be decoded and have no feature", split.num_images - len(ids),
                        split.num_images)
        paths = save_features(image_out, "image", ids, feats, fmt=args.format,
                              meta={**provenance, "data": str(split.split_dir.resolve() / "imgs"), **info})
        secs = time.perf_counter() - t0
        log.info("%d image features in %.1f s (%s) -> %s", len(ids), secs, info["cache"], paths[0])
        result["image"] = {"path": str(paths[0]), "count": int(len(ids)), "seconds": secs, "cache": info["cache"]}
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))

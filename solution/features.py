"""Extract image and/or text features with a checkpoint (cn_clip's ``eval/extract_features.py`` flags, CPU or GPU).

``bash Chinese-CLIP/feature_extract.sh``: the checkpoint's architecture, prompt and context length (flags
override with a warning). The work: :func:`solution.retrieval.extract.extract`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from solution.common import resolve_device
from solution.formats.feature_files import FORMATS
from solution.model import ATTN_IMPLS
from solution.model.compiled import BACKENDS as COMPILE_BACKENDS
from solution.model.precision import PRECISION_METAVAR, precision_flag
from solution.model.registry import run_model_cli
from solution.retrieval.extract import cache_dir_default, extract


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.features", description=__doc__.split("\n\n")[0])
    up = p.add_argument_group("cn_clip extract_features.py flags")
    up.add_argument("--extract-image-feats", action="store_true")
    up.add_argument("--extract-text-feats", action="store_true")
    up.add_argument(
        "--image-data", default="../Multimodal_Retrieval/lmdb/test/imgs", help="image LMDB (SPLIT/imgs or SPLIT)"
    )
    up.add_argument("--text-data", default="../Multimodal_Retrieval/test_texts.jsonl", help="texts JSONL")
    up.add_argument(
        "--image-feat-output-path", help="default: TEXT_DATA with _texts.jsonl -> _imgs.img_feat.{npy|jsonl}"
    )
    up.add_argument("--text-feat-output-path", help="default: TEXT_DATA minus .jsonl + .txt_feat.{npy|jsonl}")
    up.add_argument("--img-batch-size", type=int, default=64)
    up.add_argument("--text-batch-size", type=int, default=64)
    up.add_argument("--context-length", type=int, help="default: the checkpoint's (52 if unknown)")
    up.add_argument("--resume", required=True, help="checkpoint (ours, cn_clip's or an official one)")
    up.add_argument(
        "--precision", type=precision_flag, default="amp", metavar=PRECISION_METAVAR, help="amp: fp16 on GPU"
    )
    up.add_argument("--vision-model", help="default: the checkpoint's (or inferred from shapes)")
    up.add_argument("--text-model", help="default: the checkpoint's (or inferred from shapes)")
    up.add_argument("--debug", action="store_true", help="debug logging")
    ours = p.add_argument_group("ours")
    ours.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    ours.add_argument("--format", choices=FORMATS, default="npy", help="npy (+ .ids.npy) or cn_clip's jsonl")
    ours.add_argument("--prompt", help="text prompt; default: the checkpoint's")
    ours.add_argument(
        "--cache-dir", help="image feature cache (default $SOLUTION_CACHE_DIR or ~/.cache/cnclip-solution/image_feats)"
    )
    ours.add_argument("--no-cache", action="store_true", help="neither read nor write the image cache")
    ours.add_argument("--num-workers", type=int, help="image decoding workers (default min(4, CPUs - 1))")
    ours.add_argument("--no-progress", action="store_true")
    ours.add_argument(
        "--attn-impl", choices=ATTN_IMPLS, default="sdpa", help="text-tower attention: sdpa or cn_clip's own"
    )
    ours.add_argument("--torchcompile", action="store_true", help="torch.compile the towers' blocks (open_clip's flag)")
    ours.add_argument("--torchcompile-backend", choices=COMPILE_BACKENDS, default="inductor", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    if a.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    ext = "npy" if a.format == "npy" else "jsonl"
    a.text_feat_output_path = a.text_feat_output_path or f"{a.text_data.removesuffix('.jsonl')}.txt_feat.{ext}"
    a.image_feat_output_path = (
        a.image_feat_output_path or f"{a.text_data.replace('_texts.jsonl', '_imgs')}.img_feat.{ext}"
    )
    a.num_workers = a.num_workers if a.num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    a.cache_dir = None if a.no_cache else str(a.cache_dir or cache_dir_default(os.environ))
    a.device = resolve_device(a.device)
    return extract(a)


if __name__ == "__main__":
    sys.exit(run_model_cli(main))

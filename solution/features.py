"""Extract image and/or text features with a checkpoint (cn_clip's ``eval/extract_features.py`` flags, CPU or GPU).

``python -m solution.features`` (``bash Chinese-CLIP/feature_extract.sh``). Architecture, prompt and
context length come from the checkpoint's stored config (flags override with a warning). Feature
files are ``BASE.npy`` + ``BASE.ids.npy`` + ``BASE.meta.json`` (``--format npy``) or cn_clip's JSON
lines (:mod:`solution.formats.feature_files`). Image features are cached in ``--cache-dir`` (default
``$SOLUTION_CACHE_DIR`` or ``~/.cache/cnclip-solution/image_feats``): a second run against the
same gallery and vision tower reads the cache. The work: :func:`solution.retrieval.extract.extract`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from solution.common import resolve_device, run_cli
from solution.formats.feature_files import FORMATS
from solution.model import ATTN_IMPLS
from solution.model.compiled import BACKENDS as COMPILE_BACKENDS
from solution.model.precision import PRECISION_METAVAR, PRECISIONS, precision_flag
from solution.retrieval.cache import default_cache_dir
from solution.retrieval.extract import Extraction, extract


def default_outputs(args) -> tuple[str, str]:
    """cn_clip's default output names, with the format's extension."""
    ext = "npy" if args.format == "npy" else "jsonl"
    text_base = args.text_data.removesuffix(".jsonl")
    text_out = args.text_feat_output_path or f"{text_base}.txt_feat.{ext}"
    image_out = args.image_feat_output_path or "{}.img_feat.{}".format(
        args.text_data.replace("_texts.jsonl", "_imgs"), ext
    )
    return text_out, image_out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m solution.features",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up = p.add_argument_group("cn_clip extract_features.py flags")
    up.add_argument("--extract-image-feats", action="store_true")
    up.add_argument("--extract-text-feats", action="store_true")
    up.add_argument(
        "--image-data",
        default="../Multimodal_Retrieval/lmdb/test/imgs",
        help="image LMDB (SPLIT/imgs or the split directory)",
    )
    up.add_argument(
        "--text-data",
        default="../Multimodal_Retrieval/test_texts.jsonl",
        help='texts jsonl: {"text_id": int, "text": str} per line',
    )
    up.add_argument(
        "--image-feat-output-path",
        default=None,
        help="default: TEXT_DATA with _texts.jsonl -> _imgs.img_feat.{npy|jsonl}",
    )
    up.add_argument(
        "--text-feat-output-path", default=None, help="default: TEXT_DATA minus .jsonl + .txt_feat.{npy|jsonl}"
    )
    up.add_argument("--img-batch-size", type=int, default=64)
    up.add_argument("--text-batch-size", type=int, default=64)
    up.add_argument("--context-length", type=int, default=None, help="default: the checkpoint's (52 if unknown)")
    up.add_argument("--resume", required=True, help="checkpoint (ours, cn_clip's or an official one)")
    up.add_argument(
        "--precision",
        type=precision_flag,
        choices=PRECISIONS,
        default="amp",
        metavar=PRECISION_METAVAR,
        help="amp/fp16: fp16 autocast on GPU, fp32 on CPU; bf16 (or open_clip's amp_bf16) autocast on either",
    )
    up.add_argument("--vision-model", default=None, help="default: the checkpoint's (or inferred from shapes)")
    up.add_argument("--text-model", default=None, help="default: the checkpoint's (or inferred from shapes)")
    up.add_argument("--debug", action="store_true", help="debug logging")
    ours = p.add_argument_group("ours")
    ours.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    ours.add_argument("--format", choices=FORMATS, default="npy", help="npy (+ .ids.npy) or cn_clip's jsonl")
    ours.add_argument("--prompt", default=None, help="text prompt; default: the checkpoint's")
    ours.add_argument(
        "--cache-dir",
        default=None,
        help="image feature cache (default $SOLUTION_CACHE_DIR or ~/.cache/cnclip-solution/image_feats)",
    )
    ours.add_argument("--no-cache", action="store_true", help="neither read nor write the image cache")
    ours.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default min(4, CPUs - 1))")
    ours.add_argument("--no-progress", action="store_true")
    ours.add_argument(
        "--attn-impl",
        choices=ATTN_IMPLS,
        default="sdpa",
        help="text-tower attention: sdpa (fused, default) or upstream (cn_clip's own, to compare)",
    )
    ours.add_argument(
        "--torchcompile",
        action="store_true",
        help="torch.compile the towers' blocks (open_clip's flag; inductor: a C++ compiler on CPU, triton on "
        "CUDA); the compile time is logged and left out of texts/s and images/s",
    )
    ours.add_argument(
        "--torchcompile-backend", choices=COMPILE_BACKENDS, default="inductor", help=argparse.SUPPRESS
    )  # tests: aot_eager/eager capture graphs without building kernels
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    text_out, image_out = default_outputs(args)
    texts, images = args.extract_text_feats, args.extract_image_feats
    return extract(
        Extraction(
            resume=args.resume,
            text_data=args.text_data if texts else None,
            text_out=text_out if texts else None,
            image_data=args.image_data if images else None,
            image_out=image_out if images else None,
            fmt=args.format,
            vision_model=args.vision_model,
            text_model=args.text_model,
            context_length=args.context_length,
            prompt=args.prompt,
            device=resolve_device(args.device),
            precision=args.precision,
            text_batch_size=args.text_batch_size,
            img_batch_size=args.img_batch_size,
            num_workers=args.num_workers if args.num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1)),
            cache_dir=None if args.no_cache else str(args.cache_dir or default_cache_dir()),
            progress=not args.no_progress,
            attn_impl=args.attn_impl,
            torchcompile=args.torchcompile,
            torchcompile_backend=args.torchcompile_backend,
        )
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))

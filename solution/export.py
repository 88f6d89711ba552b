"""Export a checkpoint (any the toolkit writes, or an official cn_clip file; ViT vision towers only) to 🤗
transformers (``ChineseCLIPModel``) or ONNX (image and text graphs): :mod:`solution.model.export`."""

import argparse
import sys
from collections.abc import Sequence

from solution.model.export import FORMATS, export_checkpoint
from solution.model.registry import run_model_cli


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m solution.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="CK.pt", help="checkpoint to export")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf: transformers folder; onnx: image/text.onnx")
    p.add_argument("--output", required=True, metavar="DIR", help="new (or empty) output folder")
    args = p.parse_args(argv)
    config = export_checkpoint(args.checkpoint, args.format, args.output)
    print(f"exported {config.arch} ({args.format}) to {args.output}")
    prompt = config.text_prompt and f"text prompt {config.text_prompt!r}: prepend it to every text before tokenising"
    print(prompt or "text prompt: none")


if __name__ == "__main__":
    sys.exit(run_model_cli(main))

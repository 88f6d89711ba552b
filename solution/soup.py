"""Model soups: average fine-tuned checkpoints while the held-out score improves.

``bash Chinese-CLIP/model_soup.sh --checkpoints 'logs/*/checkpoints/*.pt' --val-data DIR/lmdb/valid
--method greedy --output soups/NAME``; the work: :mod:`solution.soups.make_soups`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from solution.common import SolutionError
from solution.model.precision import DTYPES, PRECISION_METAVAR, PRECISIONS, precision_flag
from solution.model.registry import run_model_cli
from solution.plots import REPORT_TO
from solution.soups.make_soups import make_soups
from solution.soups.methods import METHODS


def parse_methods(values: Sequence[str]) -> tuple[str, ...]:
    """``--method`` values, space- or comma-separated, each once."""
    out = [m.strip().lower() for v in values for m in v.split(",") if m.strip()]
    unknown = next((m for m in out if m not in METHODS), None)
    if unknown:
        raise SolutionError(f"unknown --method {unknown!r}; choose from {', '.join(METHODS)}")
    if not out:
        raise SolutionError("--method is empty")
    return tuple(dict.fromkeys(out))


def parse_alphas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise SolutionError(f"--alphas must be comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="python -m solution.soup", description=__doc__.split("\n\n")[0], formatter_class=fmt
    )
    src = p.add_argument_group("ingredients")
    src.add_argument("--checkpoints", nargs="+", default=[], metavar="GLOB", help="files or quoted globs (** allowed)")
    src.add_argument("--from-study", metavar="DIR", help="a search study folder: use its top trials' best.pt")
    src.add_argument("--top", type=int, default=5, help="how many complete trials --from-study takes")
    val = p.add_argument_group("scoring")
    val.add_argument("--val-data", metavar="LMDB_SPLIT", help="validation LMDB split (e.g. DIR/lmdb/valid)")
    val.add_argument("--val-texts", metavar="JSONL", help="queries + gold (MUGE *_texts.jsonl); default: LMDB pairs")
    val.add_argument("--select-split", type=float, metavar="F", help="choose on this fraction of queries, report rest")
    val.add_argument("--folds", type=int, metavar="K", help="cross-fit: choose without each of K query folds, score it")
    val.add_argument("--seed", type=int, default=0, help="seed of the --select-split draw (and of the --folds folds)")
    val.add_argument("--no-score", action="store_true", help="score nothing (uniform, model_stock)")
    val.add_argument("--batch-size", type=int, default=64)
    val.add_argument("--num-workers", type=int, default=0)
    val.add_argument("--precision", type=precision_flag, choices=PRECISIONS, default="fp32", metavar=PRECISION_METAVAR)
    val.add_argument("--device", default="auto")
    val.add_argument("--report-to", default="", choices=REPORT_TO, help="tensorboard: scores in OUT/tensorboard/")
    how = p.add_argument_group("soup")
    how.add_argument("--method", dest="methods", nargs="+", default=["greedy"], help=f"some of {', '.join(METHODS)}")
    how.add_argument(
        "--interpolate-with", metavar="CKPT", help="mix each soup with this checkpoint (model_stock: the start)"
    )
    how.add_argument("--alphas", help="soup weights tried with --interpolate-with; none given: 0.25,0.5,0.75")
    how.add_argument("--max-rounds", type=int, default=20, help="pairwise: most merge rounds")
    how.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: the ingredients' own if shared")
    p.add_argument("--output", required=True, metavar="DIR")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.methods, args.checkpoints = parse_methods(args.methods), tuple(args.checkpoints)
    if args.alphas is not None and not args.interpolate_with:
        raise SolutionError("--alphas needs --interpolate-with CKPT (the checkpoint the soups are interpolated with)")
    args.alphas = parse_alphas(args.alphas or "0.25,0.5,0.75") if args.interpolate_with else ()
    summary = make_soups(args)
    best = {"soup": summary["soup"], "method": summary["method"], **summary["soups"][summary["method"]]}
    print(json.dumps(best, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    sys.exit(run_model_cli(main))

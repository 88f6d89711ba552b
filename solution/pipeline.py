"""``python -m solution.pipeline --config RECIPE.yaml``: the whole plan of a recipe (``bash scripts/pipeline.sh``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from solution.model.registry import run_model_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.pipeline", description=__doc__)
    p.add_argument("--config", required=True, help="the recipe (configs/pipeline/*.yaml)")
    p.add_argument("--data", help="the data folder (MUGE layout) or CSV file; wins over the recipe's data:")
    p.add_argument("--out", help="the output folder; wins over the recipe's out:")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. runs.default.lr=1e-4")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the commands up to the ensembles, each checked by its tool's parser",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    from solution.autopilot.plan import run_plan
    from solution.autopilot.recipe import load_recipe

    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.config, data=args.data, out=args.out, sets=args.set)
    if recipe.threads:  # the edge: tiny CPU models run fastest on one thread
        import torch

        torch.set_num_threads(recipe.threads)
    result = run_plan(recipe, dry_run=args.dry_run)
    if args.dry_run:
        print("\n".join(result["commands"]))
    return result


if __name__ == "__main__":
    sys.exit(run_model_cli(main))

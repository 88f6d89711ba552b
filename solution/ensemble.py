"""Score-level ensembles: fuse members of any architecture by normalised, weighted scores.

``bash Chinese-CLIP/ensemble.sh --members A.pt B.pt --val-data DIR/lmdb/valid --output ensembles/NAME``; submit
with ``predict.sh --ensemble``. The work: :mod:`solution.ensembles.make_ensemble`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from solution.common import resolve_device
from solution.ensembles.fusion import NORMS, RERANKERS
from solution.ensembles.make_ensemble import make_ensemble
from solution.model.precision import PRECISION_METAVAR, precision_flag
from solution.model.registry import run_model_cli
from solution.plots import REPORT_TO
from solution.retrieval.extract import cache_dir_default


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="python -m solution.ensemble", description=__doc__.split("\n\n")[0], formatter_class=fmt
    )
    p.add_argument("--members", nargs="+", required=True, metavar="CKPT", help="member checkpoints (any architecture)")
    p.add_argument("--val-data", required=True, metavar="LMDB_SPLIT", help="validation LMDB split (with pairs)")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--weights", type=float, nargs="+", help="fixed member weights (no selection)")
    p.add_argument("--norm", choices=NORMS, default="zscore", help="per-query normalisation of each member's scores")
    p.add_argument(
        "--rerank", default="none", help=f"comma-separated, each kept if it helps: {', '.join(RERANKERS)}, flip"
    )
    p.add_argument("--bank", metavar="JSONL", help="texts JSONL for qb_norm's query bank (e.g. training texts)")
    p.add_argument("--bank-topk", type=int, help="qb_norm: dynamic inverted softmax's top-k")
    p.add_argument("--select-split", type=float, metavar="FRACTION", help="choose on this fraction, report the rest")
    p.add_argument("--folds", type=int, help="k-fold cross-fitting of the choice over queries")
    p.add_argument("--seed", type=int, default=0, help="seed of the --select-split draw and the folds")
    p.add_argument("--max-rounds", type=int, default=20, help="forward selection: most additions")
    p.add_argument("--context-length", type=int, help="of members holding bare weights (no config stored)")
    p.add_argument("--device", default="auto")
    p.add_argument("--report-to", default="", choices=REPORT_TO, help="tensorboard: scores in OUT/tensorboard/")
    p.add_argument(
        "--precision", type=precision_flag, default="amp", metavar=PRECISION_METAVAR, help="kept for predict"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=str(cache_dir_default(os.environ)), help="image-feature cache ('' = off)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    a.device = resolve_device(a.device)
    spec = make_ensemble(a, command=("python", "-m", "solution.ensemble", *argv))
    scores = {k: (v or {}).get("mean_recall") for k, v in spec["scores"].items() if k != "members"}
    summary = {"output": a.output, "weights": spec["weights"], "tta": spec["tta"], "rerank": spec["rerank"]["method"]}
    print(json.dumps({**summary, "scores": scores}))
    return spec


if __name__ == "__main__":
    sys.exit(run_model_cli(main))

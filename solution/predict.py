"""Top-k predictions from image and text features: the MUGE submission file and a manifest beside it.

``bash Chinese-CLIP/predict.sh``; ``--ensemble ensemble.json --image-data LMDB --text-data JSONL`` instead has
every member encode the data and fuses the scores. The work: :mod:`solution.retrieval.rank`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from solution.common import SolutionError, resolve_device
from solution.ensembles.fusion import FUSION_MEMORY_MB
from solution.ensembles.make_ensemble import predict_ensemble
from solution.model.registry import run_model_cli
from solution.retrieval.extract import cache_dir_default
from solution.retrieval.rank import DEFAULT_MEMORY_MB, DIRECTIONS, parse_score, predict

FEATS = ".npy (ours), cn_clip .jsonl, or the base name given to extraction"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--image-feats", help=f"image features: {FEATS}")
    p.add_argument("--text-feats", help=f"text features: {FEATS}")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--output", required=True, help="submission jsonl; the manifest goes beside it as .json")
    p.add_argument("--direction", choices=sorted(DIRECTIONS), default="t2i", help="t2i: a line per text (MUGE)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--chunk-size",
        type=int,
        help=f"queries per matrix product (default: {DEFAULT_MEMORY_MB} MiB of scores; --ensemble: {FUSION_MEMORY_MB})",
    )
    p.add_argument("--eval-batch-size", type=int, help="cn_clip's flag, accepted and unused (see --chunk-size)")
    p.add_argument(
        "--valid-score",
        type=parse_score,
        help="for the manifest: a mean recall, or a JSON object of r1/r5/r10/mean_recall",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="checkpoint(s) to name in the manifest (features without provenance)",
    )
    p.add_argument(
        "--allow-mixed-features", action="store_true", help="text and image features of different checkpoints"
    )
    p.add_argument("--no-progress", action="store_true")
    ens = p.add_argument_group("ensemble (instead of --image-feats/--text-feats)")
    ens.add_argument("--ensemble", metavar="JSON", help="an ensemble.json written by python -m solution.ensemble")
    ens.add_argument("--image-data", metavar="LMDB", help="test image LMDB (DIR/lmdb/test/imgs)")
    ens.add_argument("--text-data", metavar="JSONL", help="test texts (MUGE *_texts.jsonl)")
    ens.add_argument("--cache-dir", default=str(cache_dir_default(os.environ)), help="image-feature cache ('' = off)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    command = ("python", "-m", "solution.predict", *argv)
    if a.top_k < 1 or (a.chunk_size is not None and a.chunk_size < 1):
        raise SolutionError("--top-k and --chunk-size must be at least 1")
    a.device = resolve_device(a.device)
    if a.ensemble is not None:
        if a.image_feats or a.text_feats or not (a.image_data and a.text_data) or a.direction != "t2i":
            raise SolutionError("--ensemble takes --image-data and --text-data (t2i) instead of feature files")
        return predict_ensemble(a, command)
    if a.image_feats is None or a.text_feats is None:
        raise SolutionError("pass --image-feats and --text-feats (or --ensemble with --image-data and --text-data)")
    return predict(a, command)


if __name__ == "__main__":
    sys.exit(run_model_cli(main))

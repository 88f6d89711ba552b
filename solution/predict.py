"""Top-k predictions from image and text features: the MUGE submission file and a manifest beside it.

``python -m solution.predict --image-feats F --text-feats F --top-k 10 --output submissions/NAME.jsonl``
(``bash Chinese-CLIP/predict.sh``) writes ``NAME.jsonl`` (a line per text, its image ids best first;
``--direction i2t``: a line per image) and ``NAME.json``, the manifest (checkpoints, config, prompt,
feature files, validation score, command). The work: :func:`solution.retrieval.rank.predict`.

``--ensemble ensembles/NAME/ensemble.json --image-data DIR/lmdb/test/imgs --text-data test_texts.jsonl``
replaces the two feature files: every member encodes the data (images through the cache; with the
ensemble's flip TTA, the flipped images too) and the scores are fused in query chunks
(:func:`solution.ensembles.submit.predict_ensemble`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from solution.common import SolutionError, resolve_device, run_cli
from solution.ensembles.fusion import FUSION_MEMORY_MB
from solution.ensembles.members import Encoding
from solution.ensembles.submit import EnsemblePrediction, predict_ensemble
from solution.retrieval.cache import default_cache_dir
from solution.retrieval.manifest import parse_score
from solution.retrieval.rank import DEFAULT_MEMORY_MB, DIRECTIONS, Prediction, predict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.predict", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--image-feats", help="image features: .npy (ours), cn_clip .jsonl, or the base name given to extraction"
    )
    p.add_argument(
        "--text-feats", help="text features: .npy (ours), cn_clip .jsonl, or the base name given to extraction"
    )
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--output", required=True, help="submission jsonl; the manifest goes beside it as .json")
    p.add_argument(
        "--direction",
        choices=sorted(DIRECTIONS),
        default="t2i",
        help="t2i: a line per text ranking images (MUGE); i2t: a line per image ranking texts",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help=f"queries per matrix product (default: what fits in {DEFAULT_MEMORY_MB} MiB of scores; "
        f"--ensemble: fusion's working set in {FUSION_MEMORY_MB} MiB)",
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="cn_clip's flag, accepted for compatibility; the chunking here is over queries (--chunk-size)",
    )
    p.add_argument(
        "--valid-score",
        default=None,
        help="validation score for the manifest: a mean recall, or a JSON object of r1/r5/r10/mean_recall",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="checkpoint(s) to name in the manifest when the features carry no provenance",
    )
    p.add_argument(
        "--method",
        choices=["auto", "prefilter", "fp32"],
        default="auto",
        help="prefilter: bf16 candidates + exact fp32 rescoring (certified, same result); "
        "fp32: one fp32 product; auto: prefilter on CPUs with fast bf16 and large galleries",
    )
    p.add_argument("--no-progress", action="store_true")
    ens = p.add_argument_group("ensemble (instead of --image-feats/--text-feats)")
    ens.add_argument("--ensemble", metavar="JSON", help="an ensemble.json written by python -m solution.ensemble")
    ens.add_argument("--image-data", metavar="LMDB", help="test image LMDB (DIR/lmdb/test/imgs)")
    ens.add_argument("--text-data", metavar="JSONL", help="test texts (MUGE *_texts.jsonl)")
    ens.add_argument("--cache-dir", default=str(default_cache_dir()), help="image-feature cache ('' = off)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    feats = args.image_feats is not None or args.text_feats is not None
    if args.ensemble is not None:
        if feats or not (args.image_data and args.text_data) or args.direction != "t2i":
            raise SolutionError("--ensemble takes --image-data and --text-data (t2i) instead of feature files")
        return predict_ensemble(
            EnsemblePrediction(
                ensemble=args.ensemble,
                image_data=args.image_data,
                text_data=args.text_data,
                output=args.output,
                top_k=args.top_k,
                chunk_size=args.chunk_size,
                method=args.method,
                encoding=Encoding(resolve_device(args.device), "amp", 64, args.cache_dir or None),
                command=("python", "-m", "solution.predict", *argv),
            )
        )
    if args.image_feats is None or args.text_feats is None:
        raise SolutionError("pass --image-feats and --text-feats (or --ensemble with --image-data and --text-data)")
    return predict(
        Prediction(
            image_feats=args.image_feats,
            text_feats=args.text_feats,
            output=args.output,
            top_k=args.top_k,
            direction=args.direction,
            device=resolve_device(args.device),
            chunk_size=args.chunk_size,
            method=args.method,
            valid_score=parse_score(args.valid_score),
            checkpoints=tuple(args.checkpoint or ()),
            command=("python", "-m", "solution.predict", *argv),
            progress=not args.no_progress,
        )
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Top-k predictions at MUGE validation scale: ours vs cn_clip's make_topk_predictions.py, side by side.

Random L2-normalised features (default 5,008 texts x 29,806 images x 512-d, MUGE's validation
sizes). Ours runs ``solution.predict`` end to end (read features, rank, write the submission and
manifest) from ``.npy`` and from cn_clip's JSONL; upstream runs its unmodified script from the
JSONL features with its ``.cuda()`` redirected to the CPU (``cn_clip_patch.device.on_device``).

Upstream spends ~40 ms of Python per text, so by default it ranks only the first
``--upstream-texts`` texts (1,000 at full scale) and its full-scale time is extrapolated:
``fixed + (measured - fixed) * texts / upstream_texts``, where ``fixed`` (reading the image
features) is measured by a run with no texts. Pass ``--upstream-texts 0`` for all texts.
Ours and upstream run in interleaved rounds; each ratio is the median of the rounds' ratios with its
spread (a warning when wider than 20%). Predictions are compared on the texts both ranked.

    python scripts/bench_predict.py [--quick] [--out runs/bench/predict.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rounds import ratio_summary

from cn_clip_patch.device import run_upstream_main
from solution.common import write_json
from solution.formats.feature_files import load_features, save_features
from solution.predict import main as predict_main


def unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run_upstream(image_feats: Path, text_feats: Path, out: Path, k: int) -> float:
    t0 = time.perf_counter()
    run_upstream_main(
        "cn_clip.eval.make_topk_predictions",
        ["--image-feats", image_feats, "--text-feats", text_feats, "--top-k", k, "--output", out],
    )
    return time.perf_counter() - t0


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=5008)
    p.add_argument("--images", type=int, default=29806)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument(
        "--upstream-texts",
        type=int,
        default=None,
        help="texts upstream ranks (0 = all; default 1000 at full scale, all with --quick)",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median ratio and spread reported)")
    p.add_argument("--quick", action="store_true", help="500 texts x 3,000 images, 2 rounds")
    p.add_argument("--workdir", default=None, help="keep the feature files here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.images, args.rounds = 500, 3000, 2
    n_up = args.upstream_texts if args.upstream_texts is not None else (0 if args.quick else 1000)
    n_up = args.texts if n_up in (0, None) or n_up > args.texts else n_up
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.workdir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        texts, images = unit(rng, args.texts, args.dim), unit(rng, args.images, args.dim)
        tids = np.arange(args.texts, dtype=np.int64) + 300_000
        iids = rng.choice(10_000_000, args.images, replace=False).astype(np.int64)
        t0 = time.perf_counter()
        save_features(d / "text.npy", "text", tids, texts)
        save_features(d / "img.npy", "image", iids, images)
        save_features(d / "text.jsonl", "text", tids, texts)
        save_features(d / "img.jsonl", "image", iids, images)
        write_s = time.perf_counter() - t0
        sub = d / "text_sub.jsonl"
        with open(d / "text.jsonl") as f, open(sub, "w") as g:
            g.writelines(f.readline() for _ in range(n_up))
        (d / "text_none.jsonl").write_text("")
        print(
            f"{args.texts} texts x {args.images} images x {args.dim}-d, top-{args.top_k}; torch threads "
            f"{torch.get_num_threads()}; feature files written in {write_s:.1f} s",
            file=sys.stderr,
        )

        runs = []
        for rnd in range(args.rounds):  # interleaved: drift and interference hit both alike
            run = {}
            for fmt in ("npy", "jsonl"):
                t0 = time.perf_counter()
                out = d / f"ours_{fmt}.jsonl"
                predict_main(
                    f"--image-feats {d}/img.{fmt} --text-feats {d}/text.{fmt} --top-k {args.top_k} --output {out}"
                    " --device cpu --no-progress".split()
                )
                run[fmt] = time.perf_counter() - t0
            fixed = None
            if n_up < args.texts:  # extrapolating: measure the part that does not grow with the texts
                fixed = run_upstream(d / "img.jsonl", d / "text_none.jsonl", d / "up_none.jsonl", args.top_k)
            measured = run_upstream(d / "img.jsonl", sub, d / "up.jsonl", args.top_k)
            up_full = measured if fixed is None else fixed + (measured - fixed) * args.texts / n_up
            runs.append({**run, "upstream": up_full, "upstream_measured": measured, "upstream_fixed": fixed})
            print(
                f"round {rnd + 1}: ours npy {run['npy']:.2f} s, jsonl {run['jsonl']:.2f} s; upstream on {n_up} texts"
                f" {measured:.1f} s -> {up_full:.1f} s for {args.texts}"
                + (" (extrapolated)" if fixed is not None else ""),
                file=sys.stderr,
            )
        t0 = time.perf_counter()
        load_features(d / "text.npy", "text"), load_features(d / "img.npy", "image")
        load_npy = time.perf_counter() - t0

        ours_rows = read_rows(d / "ours_npy.jsonl")
        up_rows = read_rows(d / "up.jsonl")
        same_npy_jsonl = (d / "ours_npy.jsonl").read_bytes() == (d / "ours_jsonl.jsonl").read_bytes()
        identical = sum(a == b for a, b in zip(ours_rows[:n_up], up_rows))
        # Any disagreement must be a float near-tie (summation order), never a wrong ranking.
        worst_gap = 0.0
        pos = {int(i): r for r, i in enumerate(iids)}
        for a, b in zip(ours_rows[:n_up], up_rows):
            if a != b:
                q = texts[a["text_id"] - 300_000].astype(np.float64)
                sa = images[[pos[i] for i in a["image_ids"]]] @ q
                sb = images[[pos[i] for i in b["image_ids"]]] @ q
                worst_gap = max(worst_gap, float(np.abs(sa - sb).max()))

    col = {k: [r[k] for r in runs] for k in ("npy", "jsonl", "upstream")}
    up = f"upstream make_topk_predictions.py (CPU){' extrapolated' if n_up < args.texts else ''}"
    rows = []
    for what, key in (
        ("ours from .npy (read + rank + write)", "npy"),
        ("ours from cn_clip jsonl", "jsonl"),
        (up, "upstream"),
    ):
        summary = ratio_summary(what, col[key], col["upstream"])
        rows.append(
            {
                "what": what,
                "seconds": float(np.median(col[key])),
                "texts": args.texts,
                "speedup": summary["median_ratio"],
                "spread": summary["spread"],
            }
        )
    result = {
        "rows": rows,
        "texts": args.texts,
        "images": args.images,
        "dim": args.dim,
        "top_k": args.top_k,
        "upstream_texts_measured": n_up,
        "rounds": runs,
        "ours_npy_load_s": load_npy,
        "identical_rows": identical,
        "compared_rows": n_up,
        "max_score_gap_where_different": worst_gap,
        "npy_and_jsonl_identical": same_npy_jsonl,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"\nmedian of {args.rounds} interleaved rounds\n{'':56s} {'seconds':>9s} {'speedup':>8s} {'spread':>7s}")
    for r in rows:
        print(f"{r['what']:56s} {r['seconds']:9.2f} {r['speedup']:7.2f}x {100 * r['spread']:6.0f}%")
    print(
        f"identical predictions: {identical}/{n_up} texts (max score gap where different: {worst_gap:.2e}); "
        f"npy == jsonl: {same_npy_jsonl}"
    )
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

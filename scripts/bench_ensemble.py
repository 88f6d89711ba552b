"""Ensemble predict at MUGE scale: our chunked fusion vs three separate rankings vs a plain numpy fusion.

Random L2-normalised float32 features (fixed seed; default 5,008 texts x 29,806 images, MUGE's
validation sizes) for 3 members of 512, 768 and 1024 dims, top-10 of the weighted z-score fusion
(weights 0.5/0.3/0.2). Each variant runs in its own subprocess (``--child``), which loads the
features from ``.npy``, then times only the ranking and reports its own peak RSS (``ru_maxrss``)
and its RSS before ranking (modules + features loaded), so "extra" is the memory the ranking adds:

- ours: ``solution.ensembles.fusion.rerank_topk(norm="zscore")`` with the chunk size
  ``predict --ensemble`` uses (:mod:`solution.ensembles.make_ensemble`: ``fusion_chunk`` for the
  ``FUSION_MEMORY_MB`` budget, which bounds fusion's working set, so its "extra" should track it);
- 3 x predict: ``solution.retrieval.rank.topk`` once per member, as ``predict`` ranks (what one does before fusing);
- numpy fusion: the straightforward way, a full ``[Q, G]`` float32 score matrix per member,
  z-score per row, weighted sum, ``argpartition`` + a stable ``argsort`` for the top-10.

Variants are interleaved over ``--repeats`` rounds; the table gives median seconds and memory, and
the median over rounds of each variant's time ratio against the numpy fusion with its spread (a
warning when wider than 20%). The top-10s are checked against a float64 reference (numpy, in chunks of rows):
rows where ours or numpy's float32 top-10 differs from it are counted, with the largest float64
fused-score gap between the two lists (a float32 near-tie, when tiny).

    python scripts/bench_ensemble.py [--quick] [--repeats 3] [--out runs/bench/ensemble.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rounds import ratio_summary

log = logging.getLogger("bench_ensemble")

DIMS = (512, 768, 1024)
WEIGHTS = (0.5, 0.3, 0.2)
VARIANTS = {
    "ours": "ours: rerank_topk (z-score, chunked)",
    "separate": "3 x predict ranking (rank per member, no fusion)",
    "numpy": "numpy fusion (full [Q, G] float32 per member)",
}


def unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load(workdir: Path):
    return [(np.load(workdir / f"q{m}.npy"), np.load(workdir / f"g{m}.npy")) for m in range(len(DIMS))]


def zscore_np(s: np.ndarray) -> np.ndarray:
    s = s - s.mean(axis=1, keepdims=True)
    return s / s.std(axis=1, keepdims=True)


def numpy_fusion(members, weights, k: int) -> np.ndarray:
    fused = None
    for (q, g), w in zip(members, weights):
        part = zscore_np(q @ g.T) * np.float32(w)
        fused = part if fused is None else fused + part
    top = np.argpartition(-fused, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(fused, top, 1), axis=1, kind="stable")
    return np.take_along_axis(top, order, 1)


def child(variant: str, workdir: Path, k: int) -> None:
    """Run one variant on the features in ``workdir``; print one JSON line; save its top-k indices."""
    import torch

    from solution.ensembles.fusion import FUSION_MEMORY_MB, fusion_chunk, rerank_topk
    from solution.retrieval.rank import auto_chunk, topk

    members = load(workdir)
    n_gallery = members[0][1].shape[0]
    before = rss_mb()
    t0 = time.perf_counter()
    chunk = None
    if variant == "ours":
        chunk = fusion_chunk(n_gallery, FUSION_MEMORY_MB, "zscore")  # as predict --ensemble
        _, idx = rerank_topk(members, k, np.asarray(WEIGHTS), norm="zscore", chunk_size=chunk)
    elif variant == "separate":
        ids = np.arange(n_gallery, dtype=np.int64)
        idx = np.stack([ids[topk(q, g, k, chunk_size=auto_chunk(len(g)))[1]] for q, g in members])
    else:
        idx = numpy_fusion(members, WEIGHTS, k)
    seconds = time.perf_counter() - t0
    np.save(workdir / f"top_{variant}.npy", idx)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mb": peak,
                "before_mb": before,
                "threads": torch.get_num_threads(),
                "chunk": chunk,
                "budget_mb": FUSION_MEMORY_MB,
            }
        )
    )


def run_child(variant: str, workdir: Path, k: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--workdir", str(workdir), "--top-k", str(k)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_check(members, weights, k: int, tops: dict, chunk: int = 256) -> dict:
    """Rows where each float32 top-k differs from the float64 fusion's, and the largest float64 score gap there."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()  # rerank_topk's weighted mean; the numpy fusion's plain weighted sum ranks the same
    n = members[0][0].shape[0]
    out = {name: {"rows_differing": 0, "max_f64_gap": 0.0} for name in tops}
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        fused = sum(
            wm * zscore_np(q[rows].astype(np.float64) @ g.astype(np.float64).T) for (q, g), wm in zip(members, w)
        )
        ref = np.argsort(-fused, axis=1, kind="stable")[:, :k]
        ref_s = np.take_along_axis(fused, ref, 1)
        for name, top in tops.items():
            got = top[rows]
            diff = (got != ref).any(axis=1)
            out[name]["rows_differing"] += int(diff.sum())
            if diff.any():
                gap = np.abs(np.take_along_axis(fused, got, 1) - ref_s)[diff].max()
                out[name]["max_f64_gap"] = max(out[name]["max_f64_gap"], float(gap))
    return out


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=5008)
    p.add_argument("--images", type=int, default=29806)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per variant (median reported)")
    p.add_argument("--quick", action="store_true", help="1/10 scale: 500 texts x 2,980 images, 2 rounds")
    p.add_argument("--workdir", default=None, help="keep the feature files here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    p.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.images, args.repeats = 500, 2980, 2
    return args


def measure(args, d: Path) -> tuple[dict, list, dict]:
    rng = np.random.default_rng(0)
    members = [(unit(rng, args.texts, dim), unit(rng, args.images, dim)) for dim in DIMS]
    for m, (q, g) in enumerate(members):
        np.save(d / f"q{m}.npy", q)
        np.save(d / f"g{m}.npy", g)
    runs = {v: [] for v in VARIANTS}
    for r in range(args.repeats):  # interleaved: drift hits every variant alike
        for v in VARIANTS:
            runs[v].append(run_child(v, d, args.top_k))
            log.warning("repeat %d %s: %.2f s, peak %.0f MB", r + 1, v, runs[v][-1]["seconds"], runs[v][-1]["peak_mb"])
    tops = {v: np.load(d / f"top_{v}.npy") for v in ("ours", "numpy")}
    check = reference_check(members, WEIGHTS, args.top_k, tops)
    check["ours_vs_numpy_rows_differing"] = int((tops["ours"] != tops["numpy"]).any(axis=1).sum())
    return runs, members, check


def main(argv=None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.child:
        child(args.child, Path(args.workdir), args.top_k)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.workdir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        runs, _, check = measure(args, d)
    med = {
        v: {key: statistics.median(r[key] for r in runs[v]) for key in ("seconds", "peak_mb", "before_mb")}
        for v in VARIANTS
    }
    base = med["numpy"]
    rows = []
    for v, what in VARIANTS.items():
        m = med[v]
        extra = m["peak_mb"] - m["before_mb"]
        speed = ratio_summary(what, [r["seconds"] for r in runs["numpy"]], [r["seconds"] for r in runs[v]])
        rows.append(
            {
                "what": what,
                "seconds": m["seconds"],
                "peak_rss_mb": m["peak_mb"],
                "extra_mb": extra,
                "time_ratio_over_numpy": speed["median_ratio"],
                "spread": speed["spread"],
                "extra_mem_ratio_over_numpy": extra / (base["peak_mb"] - base["before_mb"]),
            }
        )
    result = {
        "rows": rows,
        "texts": args.texts,
        "images": args.images,
        "dims": list(DIMS),
        "weights": list(WEIGHTS),
        "top_k": args.top_k,
        "repeats": args.repeats,
        "torch_threads": runs["ours"][0]["threads"],
        "ours_chunk": runs["ours"][0]["chunk"],
        "ours_budget_mb": runs["ours"][0]["budget_mb"],
        "top10_check_vs_float64": check,
    }
    print(
        f"{args.texts} texts x {args.images} images, members {'/'.join(map(str, DIMS))}-d, weights "
        f"{'/'.join(map(str, WEIGHTS))}, z-score, top-{args.top_k}; median of {args.repeats} interleaved runs; "
        f"ours: chunks of {result['ours_chunk']} queries for a {result['ours_budget_mb']} MB fusion budget\n"
    )
    print(
        "| variant | seconds | peak RSS MB | extra MB | time / numpy (median of rounds, spread) | extra mem / numpy |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['what']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['extra_mb']:.0f} | "
            f"{r['time_ratio_over_numpy']:.3f} ({100 * r['spread']:.0f}%) | {r['extra_mem_ratio_over_numpy']:.3f} |"
        )
    print(
        f"\ntop-{args.top_k} vs the float64 fusion: "
        + "; ".join(
            f"{n}: {c['rows_differing']}/{args.texts} rows differ (max float64 score gap {c['max_f64_gap']:.2e})"
            for n, c in check.items()
            if n != "ours_vs_numpy_rows_differing"
        )
        + f"; ours vs numpy float32: {check['ours_vs_numpy_rows_differing']} rows differ"
    )
    if args.out:
        from solution.common import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

"""Peak memory and time of averaging N full-size checkpoints: ``solution.soup`` (streamed) vs the naive way.

Writes N random fp16 checkpoints of the full-size model (default ViT-H-14 + RoBERTa-wwm-ext-large,
~1.9 GB each; ``--quick``: ViT-B-16 + RoBERTa-wwm-ext-base, ~0.4 GB) to a temporary folder, then for
each N of ``--counts`` runs, ``--rounds`` times and interleaved round by round, in a subprocess:

- ours: ``python -m solution.soup --checkpoints ... --method uniform --no-score``;
- naive (the usual script; upstream cn_clip has no soup tool): ``torch.load`` every checkpoint, average
  in fp32, save. Skipped when its estimated peak would not fit in the available memory.

Peak RSS is sampled with psutil every 20 ms (process + children) and cross-checked with the child's
``ru_maxrss``. Times are compared as the median of the per-round ratios ours/naive with their spread
(min to max); a spread wider than 20% of the median is flagged as too noisy to read.

    python scripts/bench_soup.py [--quick] [--counts 2,8] [--rounds 3] [--dir /tmp] [--out bench_soup.json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

GB = 1024**3

NAIVE = r"""
import resource, sys, torch
paths, out = sys.argv[1:-1], sys.argv[-1]
sds = [torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in paths]  # all at once
avg = {k: sum(sd[k].float() for sd in sds) / len(sds) for k in sds[0]}
torch.save({"state_dict": {k: v.half() for k, v in avg.items()}}, out)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

OURS = r"""
import resource, sys
from solution.soup import main
main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_checkpoints(folder: Path, vision: str, text: str, n: int) -> tuple[list[Path], int]:
    """``n`` fp16 checkpoints of one random model, each shifted by a different constant (distinct weights)."""
    from cn_clip.clip.model import CLIP

    from solution.model import ModelConfig, save_checkpoint

    config = ModelConfig(vision, text)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIP(**config.model_info).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=gen) * 0.02).half() for k, s in shapes.items()}
    paths = []
    for i in range(n):
        sd = {k: v + i * 1e-3 for k, v in base.items()} if i else base
        paths.append(save_checkpoint(folder / f"ckpt_{i}.pt", sd, config, name=f"random-{i}"))
        print(f"  wrote {paths[-1].name} ({paths[-1].stat().st_size / GB:.2f} GB)", flush=True)
    return paths, sum(v.numel() for v in base.values())


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``: peak RSS (psutil, 20 ms polling, + children; and without file-backed pages) and seconds."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = anon = 0
    while proc.poll() is None:
        try:
            infos = [ps.memory_info()] + [c.memory_info() for c in ps.children(recursive=True)]
            peak = max(peak, sum(i.rss for i in infos))
            anon = max(anon, sum(i.rss - i.shared for i in infos))  # minus file-backed (mmap) pages
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {err[-2000:]}")
    maxrss = next((int(line.split()[1]) * 1024 for line in out.splitlines() if line.startswith("MAXRSS_KB")), 0)
    return {"peak_rss_gb": max(peak, maxrss) / GB, "peak_anon_gb": anon / GB, "seconds": seconds}


def summarize(runs: list[dict]) -> dict:
    """The medians of a side's rounds (the largest peak: memory does not average out)."""
    return {
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "peak_anon_gb": max(r["peak_anon_gb"] for r in runs),
        "seconds": statistics.median(r["seconds"] for r in runs),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ViT-B-16 + RoBERTa-wwm-ext-base (~0.4 GB per checkpoint)")
    p.add_argument("--counts", default="2,8", help="numbers of checkpoints to average")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of ours and naive per count")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary checkpoints go")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    vision, text = (
        ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese") if args.quick else ("ViT-H-14", "RoBERTa-wwm-ext-large-chinese")
    )
    counts = sorted({int(c) for c in args.counts.split(",")})

    from cn_clip.clip.model import CLIP

    from solution.model import ModelConfig

    with torch.device("meta"):
        params = sum(v.numel() for v in CLIP(**ModelConfig(vision, text).model_info).state_dict().values())
    size, need, free = params * 2, params * 2 * (max(counts) + 2) * 1.05, shutil.disk_usage(args.dir).free
    print(f"{vision} + {text}: {params / 1e6:.0f}M parameters, {size / GB:.2f} GB per fp16 checkpoint", flush=True)
    if free < need:
        raise SystemExit(f"not enough disk space in {args.dir}: need ~{need / GB:.1f} GB, have {free / GB:.1f} GB")

    work = Path(tempfile.mkdtemp(prefix="bench_soup_", dir=args.dir))
    rows = []
    try:
        paths, _ = make_checkpoints(work, vision, text, max(counts))
        for n in counts:
            subset = [str(x) for x in paths[:n]]
            naive_est = (n * size + params * 4 + size) / GB  # all fp16 copies + fp32 sum + fp16 output
            run_naive = naive_est < 0.6 * psutil.virtual_memory().available / GB
            ours, naive = [], []
            for _ in range(args.rounds):  # interleaved: a drift in the machine's speed hits both sides alike
                soup = [*subset, "--method", "uniform", "--no-score", "--output", str(work / f"soup_{n}")]
                ours.append(measure([sys.executable, "-c", OURS, "--checkpoints", *soup]))
                shutil.rmtree(work / f"soup_{n}", ignore_errors=True)
                if run_naive:
                    naive.append(measure([sys.executable, "-c", NAIVE, *subset, str(work / f"naive_{n}.pt")]))
                    (work / f"naive_{n}.pt").unlink(missing_ok=True)
            ratios = [o["seconds"] / v["seconds"] for o, v in zip(ours, naive)]
            row = {"n": n, "ours": summarize(ours), "naive": summarize(naive) if naive else None}
            row.update(naive_estimate_gb=naive_est, checkpoint_gb=size / GB, time_ratios=ratios)
            if ratios:
                med = statistics.median(ratios)
                row.update(time_ratio=med, time_ratio_spread=(max(ratios) - min(ratios)) / med)
            rows.append(row)
            theirs = f"{row['naive']['peak_rss_gb']:.2f} GB" if naive else f"skipped (~{naive_est:.1f} GB)"
            print(f"  n={n}: ours {row['ours']['peak_rss_gb']:.2f} GB; naive {theirs}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\npeak RSS and time averaging N fp16 checkpoints of {vision} + {text} ({size / GB:.2f} GB each)")
    print(
        f"{'N':>3} | {'ours GB':>8} | {'(anon)':>6} | {'naive GB':>9} | {'ours/naive':>10} | time ours/naive (spread)"
    )
    for r in rows:
        o, nv = r["ours"], r["naive"]
        naive_gb = nv["peak_rss_gb"] if nv else r["naive_estimate_gb"]
        mem = f"{r['n']:>3} | {o['peak_rss_gb']:8.2f} | {o['peak_anon_gb']:6.2f} | "
        mem += f"{naive_gb:9.2f} | " if nv else f"~{naive_gb:7.1f}* | "
        timing = f"{r['time_ratio']:.2f} ({100 * r['time_ratio_spread']:.0f}%)" if nv else "-"
        noisy = "  <- spread > 20%: too noisy to read" if nv and r["time_ratio_spread"] > 0.2 else ""
        print(f"{mem}{o['peak_rss_gb'] / naive_gb:10.2f} | {timing}{noisy}")
    print("peak RSS includes the memory-mapped checkpoint being read (file-backed, reclaimable); (anon) leaves it out")
    if any(not r["naive"] for r in rows):
        print("* naive not run (would not fit); its estimate: N x checkpoint + fp32 sum + output")
    result = {"vision": vision, "text": text, "params": params, "rounds": args.rounds, "rows": rows}
    if args.out:
        from solution.common import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

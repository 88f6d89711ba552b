"""Features per second on this CPU: the ONNX export in ONNX Runtime vs the PyTorch model, side by side.

Random-weight ViT-B-16 + RoBERTa-wwm-ext-base-chinese (``--quick``: ViT-B-32 + RBT3-chinese, fewer
items and rounds), written as a checkpoint and exported with ``python -m solution.export --format
onnx``. Both engines get the same preprocessed image batches and the same token batches (MUGE-like
texts, each batch cut to its longest text, as the toolkit does), fp32, the same number of threads,
in interleaved rounds (the order alternating). Reported per tower: the median throughput of each and
the median of the per-round ratios ONNX/PyTorch with their range; a spread (range / median) over 20%
is flagged. Features must agree (cosine >= 0.9999).

    python scripts/bench_export.py [--quick] [--rounds 5] [--out runs/bench/export.json]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cn_clip_patch.prompt import tokenize
from solution.common import write_json
from solution.model import ModelConfig, build_model, load_model, save_checkpoint
from solution.model.export import export_checkpoint

CHARS = (
    "连衣裙男士运动鞋透气轻便夏季新款苹果手机壳儿童玩具车保温杯红色白色黑色纯棉短袖长袖女装家用厨房收纳盒办公椅实木书桌"
)
log = logging.getLogger("bench_export")


def batches(config: ModelConfig, n_images: int, n_texts: int, batch_size: int, rng) -> dict[str, list[np.ndarray]]:
    """Preprocessed-size random pixel batches and token-id batches of MUGE-like texts (4-16 characters)."""
    r = config.image_resolution
    images = [
        rng.standard_normal((min(batch_size, n_images - s), 3, r, r), np.float32)
        for s in range(0, n_images, batch_size)
    ]
    texts = ["".join(rng.choice(list(CHARS), int(rng.integers(4, 17)))) for _ in range(n_texts)]
    tokens = [
        tokenize(texts[s : s + 4 * batch_size], config.context_length).numpy()
        for s in range(0, n_texts, 4 * batch_size)
    ]
    return {"image": images, "text": tokens}


def run_torch(model, tower: str, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        x = torch.from_numpy(batch)
        f = model.encode_image(x) if tower == "image" else model.encode_text(x)
        return (f / f.norm(dim=-1, keepdim=True)).numpy()


def timed(fn, items: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    t0 = time.perf_counter()
    out = [fn(b) for b in items]
    return sum(len(b) for b in items) / (time.perf_counter() - t0), out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision-model", default="ViT-B-16")
    p.add_argument("--text-model", default="RoBERTa-wwm-ext-base-chinese")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (texts: 4x)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--quick", action="store_true", help="ViT-B-32 + RBT3-chinese, 8 images, 64 texts, 3 rounds")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.vision_model, args.text_model, args.images, args.texts, args.rounds = "ViT-B-32", "RBT3-chinese", 8, 64, 3
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import onnxruntime as ort

    threads = torch.get_num_threads()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        config = ModelConfig(args.vision_model, args.text_model)
        torch.manual_seed(0)
        save_checkpoint(Path(tmp) / "random.pt", build_model(config).state_dict(), config)
        export_checkpoint(Path(tmp) / "random.pt", "onnx", Path(tmp) / "onnx")
        model, config, _ = load_model(Path(tmp) / "random.pt")  # the toolkit's model: SDPA text attention
        model.eval()
        sessions = {
            t: ort.InferenceSession(Path(tmp) / "onnx" / f"{t}.onnx", opts, providers=["CPUExecutionProvider"])
            for t in ("image", "text")
        }
    data = batches(config, args.images, args.texts, args.batch_size, np.random.default_rng(0))
    names = {"image": "pixel_values", "text": "input_ids"}
    engines = {
        "torch": lambda tower: lambda b: run_torch(model, tower, b),
        "onnx": lambda tower: lambda b: sessions[tower].run(None, {names[tower]: b})[0],
    }
    print(
        f"{config.arch}, CPU fp32, {threads} threads, {args.images} images, {args.texts} texts, {args.rounds} rounds",
        file=sys.stderr,
    )
    rows = []
    for tower, items in data.items():
        speed = {"torch": [], "onnx": []}
        for rnd in range(-1, args.rounds):  # round -1: warm-up and the agreement check, not timed
            order = ("torch", "onnx") if rnd % 2 else ("onnx", "torch")
            outs = {}
            for engine in order:
                rate, outs[engine] = timed(engines[engine](tower), items)
                if rnd >= 0:
                    speed[engine].append(rate)
            if rnd < 0:
                cos = min(float((a * b).sum(-1).min()) for a, b in zip(outs["torch"], outs["onnx"]))
                if cos < 0.9999:
                    raise SystemExit(f"{tower} features disagree: min cosine {cos:.6f}")
        ratios = [o / t for o, t in zip(speed["onnx"], speed["torch"])]
        ratio = statistics.median(ratios)
        spread = (max(ratios) - min(ratios)) / ratio
        if spread > 0.2:
            log.warning(
                "%s: the ONNX/PyTorch ratio varies by %.0f%% over the rounds: a busy machine?", tower, 100 * spread
            )
        rows.append(
            {
                "tower": tower,
                "torch_per_s": statistics.median(speed["torch"]),
                "onnx_per_s": statistics.median(speed["onnx"]),
                "onnx_over_torch": ratio,
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "spread": spread,
            }
        )
    print(f"\n{'tower':<6} | {'PyTorch /s':>10} | {'ONNX RT /s':>10} | {'ONNX/PyTorch (min-max)':>22} | spread")
    for r in rows:
        ratio = f"{r['onnx_over_torch']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        print(
            f"{r['tower']:<6} | {r['torch_per_s']:10.1f} | {r['onnx_per_s']:10.1f} | {ratio:>22} | {100 * r['spread']:.0f}%"
        )
    result = {"arch": config.arch, "threads": threads, "rounds": args.rounds, "rows": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

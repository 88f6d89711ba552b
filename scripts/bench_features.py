"""Feature extraction speed: ours vs cn_clip's extract_features.py, side by side on the same data.

Random-weight ViT-B-16 + RoBERTa-wwm-ext-base-chinese (``--quick``: ViT-B-32 + RBT3-chinese and
fewer items), the same LMDB of JPEG images and the same texts. Upstream runs its unmodified
script (``.cuda()`` redirected by ``cn_clip_patch.device.on_device``, ``--precision fp32``); its
text and image loops are timed by wrapping its ``tqdm``. Ours runs ``solution.features`` (timed
from its own result: encode + write, no cache). The bare model forward on pre-decoded images
bounds what any image path can reach. The three run in interleaved rounds; each ratio is the median
of the rounds' ratios with its spread (a warning when wider than 20%). Then ours with the cache
(miss, then hit). Features must agree to 1e-5.

    python scripts/bench_features.py [--quick] [--device cpu] [--out runs/bench/features.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tqdm as tqdm_pkg
from PIL import Image
from rounds import ratio_summary

from cn_clip_patch.device import run_upstream_main
from solution.common import write_json
from solution.data.datasets import decode_image, eval_transform
from solution.data.lmdb_io import LMDBSplit, write_split
from solution.features import main as features_main
from solution.formats.feature_files import load_features
from solution.model import ModelConfig, build_model, load_model, save_checkpoint

CHARS = (
    "连衣裙男士运动鞋透气轻便夏季新款苹果手机壳儿童玩具车保温杯红色白色黑色纯棉短袖长袖女装"
    "家用厨房收纳盒办公椅实木书桌蓝牙耳机无线充电宝大容量防水户外登山背包"
)


def make_data(d: Path, n_images: int, n_texts: int, rng) -> None:
    images = []
    for i in range(n_images):
        h, w = int(rng.integers(400, 800)), int(rng.integers(400, 800))
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)
        arr = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)  # photo-like JPEG sizes
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        images.append((1_000_000 + i, base64.urlsafe_b64encode(buf.getvalue())))
    # MUGE-like queries: 4-16 characters (about 12 tokens with [CLS]/[SEP]).
    texts = ["".join(rng.choice(list(CHARS), int(rng.integers(4, 17)))) for _ in range(n_texts)]
    write_split(d / "lmdb" / "bench", images, [(1_000_000, 5_000 + i, t) for i, t in enumerate(texts)])
    with open(d / "bench_texts.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text_id": 5_000 + i, "text": t}, ensure_ascii=False) + "\n")


class TimedLoops:
    """Stand-in for upstream's ``tqdm``: records (wall, CPU) seconds of each loop it wraps (body included)."""

    loops: list[tuple[float, float]] = []

    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        t0, c0 = time.perf_counter(), time.process_time()
        yield from self.iterable
        TimedLoops.loops.append((time.perf_counter() - t0, time.process_time() - c0))


def run_upstream(argv: list[str]) -> tuple[float, list[tuple[float, float]]]:
    saved_tqdm, tqdm_pkg.tqdm = tqdm_pkg.tqdm, TimedLoops
    TimedLoops.loops = []
    t0 = time.perf_counter()
    try:
        run_upstream_main("cn_clip.eval.extract_features", argv)
    finally:
        tqdm_pkg.tqdm = saved_tqdm
    return time.perf_counter() - t0, list(TimedLoops.loops)


@torch.inference_mode()
def bare_forward(ckpt: Path, split_dir: Path, batch_size: int) -> float:
    """Seconds for ``model.encode_image`` alone over images decoded and transformed beforehand."""
    model, config, _ = load_model(ckpt)
    model.eval()
    split = LMDBSplit(split_dir, need_pairs=False)
    tf = eval_transform(config.image_resolution)
    images = torch.stack([tf(decode_image(split.image_b64(i))) for i in split.image_ids()])
    t0 = time.perf_counter()
    for s in range(0, len(images), batch_size):
        f = model.encode_image(images[s : s + batch_size])
        f = f / f.norm(dim=-1, keepdim=True)
    return time.perf_counter() - t0


def _ratio(summary: dict) -> dict:
    return {"ours_over_upstream": summary["median_ratio"], "spread": summary["spread"]}


def common_argv(d: Path, precision: str, img_batch: int, text_batch: int) -> list[str]:
    """The flags both extractors take over ``make_data``'s folder and its ``random.pt``."""
    return [
        "--image-data",
        str(d / "lmdb/bench/imgs"),
        "--text-data",
        str(d / "bench_texts.jsonl"),
        "--resume",
        str(d / "random.pt"),
        "--precision",
        precision,
        "--context-length",
        "52",
        "--img-batch-size",
        str(img_batch),
        "--text-batch-size",
        str(text_batch),
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--texts", type=int, default=192)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median ratio and spread reported)")
    p.add_argument("--vision-model", default="ViT-B-16")
    p.add_argument("--text-model", default="RoBERTa-wwm-ext-base-chinese")
    p.add_argument("--img-batch-size", type=int, default=16, help="both sides (several batches let decoding overlap)")
    p.add_argument("--text-batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None, help="ours: image decoding workers (default: auto)")
    p.add_argument("--quick", action="store_true", help="ViT-B-32 + RBT3-chinese, 16 images, 64 texts")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.vision_model, args.text_model, args.images, args.texts, args.rounds = "ViT-B-32", "RBT3-chinese", 16, 64, 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.workdir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        make_data(d, args.images, args.texts, rng)
        torch.manual_seed(0)
        config = ModelConfig(args.vision_model, args.text_model)
        save_checkpoint(d / "random.pt", build_model(config).state_dict(), config, epoch=0, step=0)
        print(
            f"{config.arch} random weights, {args.images} images, {args.texts} texts, torch threads "
            f"{torch.get_num_threads()}",
            file=sys.stderr,
        )
        common = common_argv(d, "fp32", args.img_batch_size, args.text_batch_size)

        ours_argv = [
            "--extract-text-feats",
            "--extract-image-feats",
            *common,
            "--device",
            "cpu",
            "--no-progress",
            "--text-feat-output-path",
            str(d / "txt.npy"),
            "--image-feat-output-path",
            str(d / "img.npy"),
        ]
        if args.num_workers is not None:
            ours_argv += ["--num-workers", str(args.num_workers)]
        runs = []
        for rnd in range(args.rounds):  # interleaved: drift and interference hit both alike
            _, loops = run_upstream(
                [
                    "--extract-text-feats",
                    "--extract-image-feats",
                    *common,
                    "--vision-model",
                    args.vision_model,
                    "--text-model",
                    args.text_model,
                    "--text-feat-output-path",
                    str(d / "up_txt.jsonl"),
                    "--image-feat-output-path",
                    str(d / "up_img.jsonl"),
                ]
            )
            (up_text, up_text_cpu), (up_image, _) = loops  # upstream does texts first, then images
            r = features_main([*ours_argv, "--no-cache"])
            bare = bare_forward(d / "random.pt", d / "lmdb/bench", args.img_batch_size)
            runs.append(
                {
                    "upstream_text_s": up_text,
                    "upstream_text_cpu_s": up_text_cpu,
                    "upstream_image_s": up_image,
                    "ours_text_s": r["text"]["seconds"],
                    "ours_text_cpu_s": r["text"]["cpu_seconds"],
                    "ours_image_s": r["image"]["seconds"],
                    "bare_image_s": bare,
                }
            )
            print(f"round {rnd + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1].items()), file=sys.stderr)
        col = {k: [run[k] for run in runs] for k in runs[0]}
        med = {k: float(np.median(v)) for k, v in col.items()}
        cache = ["--cache-dir", str(d / "cache")]
        miss = features_main([*ours_argv[1:], *cache])["image"]  # images only: fills the cache (hashing included)
        hit = features_main([*ours_argv[1:], *cache])["image"]
        assert (miss["cache"], hit["cache"]) == ("miss", "hit")

        diffs = {}
        for kind, up, ours in (("text", "up_txt.jsonl", "txt.npy"), ("image", "up_img.jsonl", "img.npy")):
            a, b = load_features(d / up, kind), load_features(d / ours, kind)
            assert a.ids.tolist() == b.ids.tolist(), f"{kind} ids differ"
            diffs[kind] = float(np.abs(a.feats - b.feats).max())

    n_t, n_i = args.texts, args.images
    texts = ratio_summary("texts/s", col["ours_text_s"], col["upstream_text_s"])
    texts_cpu = ratio_summary("texts per CPU-second", col["ours_text_cpu_s"], col["upstream_text_cpu_s"])
    images = ratio_summary("images/s", col["ours_image_s"], col["upstream_image_s"])
    bare = ratio_summary("images/s vs the bare forward", col["ours_image_s"], col["bare_image_s"])
    rows = [
        {
            "what": "texts/s",
            "ours": n_t / med["ours_text_s"],
            "upstream": n_t / med["upstream_text_s"],
            **_ratio(texts),
        },
        {
            "what": "texts per CPU-second",
            "ours": n_t / med["ours_text_cpu_s"],
            "upstream": n_t / med["upstream_text_cpu_s"],
            **_ratio(texts_cpu),
        },
        {
            "what": "images/s",
            "ours": n_i / med["ours_image_s"],
            "upstream": n_i / med["upstream_image_s"],
            "bare_forward": n_i / med["bare_image_s"],
            **_ratio(images),
            "ours_over_bare": bare["median_ratio"],
        },
        {
            "what": "images/s, first run with the cache",
            "ours": n_i / miss["seconds"],
            "upstream": n_i / med["upstream_image_s"],
            "ours_over_upstream": med["upstream_image_s"] / miss["seconds"],
        },
        {
            "what": "images/s, cache hit",
            "ours": n_i / hit["seconds"],
            "upstream": n_i / med["upstream_image_s"],
            "ours_over_upstream": med["upstream_image_s"] / hit["seconds"],
        },
    ]
    rows[0]["max_abs_diff"], rows[2]["max_abs_diff"] = diffs["text"], diffs["image"]
    result = {
        "rows": rows,
        "model": config.arch,
        "images": n_i,
        "texts": n_t,
        "device": "cpu",
        "precision": "fp32",
        "img_batch_size": args.img_batch_size,
        "text_batch_size": args.text_batch_size,
        "torch_threads": torch.get_num_threads(),
        "rounds": runs,
        "reported": "rates: median seconds of the rounds; ours_over_upstream: median of the rounds' ratios",
    }
    print(f"\n{config.arch}, CPU fp32, {n_i} images / {n_t} texts, median of {args.rounds} interleaved rounds")
    print(
        f"{'':36s} {'ours':>9s} {'upstream':>9s} {'bare':>9s} {'ours/upstream':>14s} {'spread':>7s} {'max|diff|':>10s}"
    )
    for row in rows:
        bare_s = f"{row['bare_forward']:9.2f}" if row.get("bare_forward") else f"{'':9s}"
        diff = f"{row['max_abs_diff']:10.1e}" if "max_abs_diff" in row else ""
        spread = f"{100 * row['spread']:6.0f}%" if "spread" in row else f"{'':7s}"
        print(
            f"{row['what']:36s} {row['ours']:9.2f} {row['upstream']:9.2f} {bare_s} {row['ours_over_upstream']:13.2f}x "
            f"{spread} {diff}"
        )
    print(f"ours image path / bare forward (throughput): {rows[2]['ours_over_bare']:.3f} (1.0 = no overhead)")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

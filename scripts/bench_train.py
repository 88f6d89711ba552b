"""Training step throughput: our loop vs cn_clip's ``cn_clip.training.train.train``, side by side.

Same random-weight model (ViT-B-16 + RoBERTa-wwm-ext-base-chinese; ``--quick``: ViT-Tiny +
RBT-Tiny), same LMDB (made here: photo-like JPEGs, MUGE-like 4-16 character queries), same batch
size, precision and AdamW settings, each starting from the same weights:

- ``upstream``: cn_clip's own ``train()`` for N steps (its DataLoader, texts padded to 52 tokens,
  the model wrapped in DDP as it expects; on CPU via ``cn_clip_patch.device.on_device`` and a
  one-process gloo group). Timed around the call, after a 1-step warm-up call.
- ``ours``: ``solution.train.main`` (the real trainer: our data path, texts cut to the longest in
  the batch, same-text masking, logging, tqdm off), N+1 steps; per-step wall time from the
  ``time`` stamps of its metrics lines, the first (warm-up) step left out.
- ``bare``: the same model, a plain forward + CLIP loss + backward + AdamW step on batches already
  in memory (our tokenisation): the floor any loop can reach. ``overhead`` = ours/bare - 1.
- with ``--torchcompile``: ``ours+compile`` (the trainer with ``--torchcompile``; the seconds it logs as
  ``compile_s`` inside the timed window are subtracted, the warm-up steps hold the first compile) and
  ``bare+compile`` (the bare step with the towers compiled by the same code, warm-up = compile).

The variants run one after the other (upstream first), each once: on a shared machine run it
twice or more and compare, and note the load.

    python scripts/bench_train.py [--quick] [--device cpu|cuda] [--steps 3] [--batch-size 8] [--torchcompile] [--out FILE]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch
from PIL import Image

from cn_clip_patch.device import on_device, single_process_group
from solution.common import autocast_context, resolve_device, write_json
from solution.data.lmdb_io import write_split
from solution.model import ModelConfig, build_model, save_checkpoint
from solution.training.step import clip_loss

CHARS = (
    "连衣裙男士运动鞋透气轻便夏季新款苹果手机壳儿童玩具车保温杯红色白色黑色纯棉短袖长袖女装"
    "家用厨房收纳盒办公椅实木书桌蓝牙耳机无线充电宝大容量防水户外登山背包"
)


def make_lmdb(d: Path, n: int, rng) -> Path:
    images, pairs = [], []
    for i in range(n):
        h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)
        arr = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        images.append((1_000 + i, base64.urlsafe_b64encode(buf.getvalue())))
        pairs.append((1_000 + i, 5_000 + i, "".join(rng.choice(list(CHARS), int(rng.integers(4, 17))))))
    write_split(d, images, pairs)
    return d


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_upstream(model, sd, res: int, split: Path, a, device) -> float:
    """Seconds per step of cn_clip's train() (after a warm-up call of ``a.warmup_steps`` steps)."""
    from cn_clip.training.data import get_data
    from cn_clip.training.scheduler import cosine_lr
    from cn_clip.training.train import train

    model.load_state_dict(sd)
    args = SimpleNamespace(
        train_data=str(split),
        val_data=None,
        batch_size=a.batch_size,
        valid_batch_size=a.batch_size,
        num_workers=0,
        valid_num_workers=0,
        use_augment=False,
        vision_model=a.vision,
        seed=123,
        context_length=52,
        accum_freq=1,
        distillation=False,
        aggregate=True,
        gather_with_grad=False,
        mask_ratio=0.0,
        local_device_rank=device.index or 0,
        report_training_batch_acc=False,
        precision="amp" if a.precision == "amp" else "fp32",
        freeze_vision=False,
        log_interval=10**6,
        rank=0,
        world_size=1,
        valid_step_interval=None,
        should_save=False,
        save_step_frequency=-1,
        use_flash_attention=False,
        max_steps=a.warmup_steps,
        logs=None,
        name="bench",
    )
    redirect = on_device(device) if device.type == "cpu" else contextlib.nullcontext()
    # upstream reads the image size from its own config folder; ViT-Tiny lives in ours
    resolution = mock.patch("cn_clip.training.data.fetch_resolution", lambda name: res)
    with redirect, resolution, single_process_group("gloo" if device.type == "cpu" else "nccl"):
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if device.type == "cpu" else [device.index or 0]
        )
        data = get_data(args, epoch_id=0, max_txt_length=52)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
        sched = cosine_lr(opt, 1e-5, 1, 100)
        scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" else None
        train(ddp, data, 0, opt, scaler, sched, args, 0)  # warm-up
        args.max_steps = a.steps
        data = get_data(args, epoch_id=0, max_txt_length=52)
        _sync(device)
        t0 = time.perf_counter()
        train(ddp, data, 0, opt, scaler, sched, args, 0)
        _sync(device)
        dt = time.perf_counter() - t0
        del ddp
    return dt / a.steps


def run_ours(ckpt: Path, split: Path, a, device, logs: Path, extra: tuple = (), name: str = "ours") -> float:
    from solution.training.trainer import main

    argv = [
        "--train-data",
        str(split),
        "--resume",
        str(ckpt),
        "--reset-data-offset",
        "--reset-optimizer",
        "--logs",
        str(logs),
        "--name",
        name,
        "--batch-size",
        str(a.batch_size),
        *extra,
        "--max-steps",
        str(a.steps + a.warmup_steps),
        "--lr",
        "1e-5",
        "--warmup",
        "1",
        "--num-workers",
        "0",
        "--precision",
        a.precision,
        "--device",
        str(device),
        "--log-interval",
        "1",
        "--no-progress",
        "--no-plot",
        "--save-epoch-frequency",
        "0",
        "--valid-epoch-interval",
        "0",
    ]
    main(argv)
    rows = [json.loads(x) for x in open(logs / name / "metrics.jsonl", encoding="utf-8")]
    train = [r for r in rows if r["kind"] == "train"]
    stamps = [r["time"] for r in train]
    compiling = sum(r.get("compile_s", 0.0) for r in train[a.warmup_steps :])  # a recompile in the timed steps
    # after the same warm-up as the others
    return (stamps[-1] - stamps[a.warmup_steps - 1] - compiling) / a.steps


def run_bare(model, sd, config, split: Path, a, device, compile_model: bool = False) -> float:
    from solution.training.loaders import open_split, train_loader

    model.load_state_dict(sd)
    model.train()
    if compile_model:
        import copy

        from solution.model.compiled import CompileClock, compile_towers

        model = compile_towers(copy.deepcopy(model), device)
        clock = CompileClock()
    loader = train_loader(
        open_split(str(split), "bench"),
        resolution=config.image_resolution,
        augment="none",
        context_length=52,
        prompt="",
        batch_size=a.batch_size,
        rank=0,
        world=1,
        seed=123,
        epoch=0,
        start=0,
        stop=a.steps + a.warmup_steps,
        num_workers=0,
    )
    batches = [(im.to(device), tok.to(device)) for im, tok, _, _ in loader]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    scaler = torch.amp.GradScaler("cuda") if a.precision == "amp" and device.type == "cuda" else None

    def step(images, tokens):
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, a.precision):
            img, txt, scale = model(images, tokens)
            loss, _ = clip_loss(img, txt, scale, None)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    for images, tokens in batches[: a.warmup_steps]:  # warm-up
        step(images, tokens)
    _sync(device)
    if compile_model:
        print(f"bare+compile: warm-up compile {clock.lap():.1f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    for images, tokens in batches[a.warmup_steps :]:
        step(images, tokens)
    _sync(device)
    spent = clock.lap() if compile_model else 0.0  # a recompile in the timed steps (a new text length)
    return (time.perf_counter() - t0 - spent) / (len(batches) - a.warmup_steps)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="ViT-Tiny + RBT-Tiny (seconds) instead of ViT-B-16 + RoBERTa base"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3; 5 with --quick)")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=2,
        help="untimed steps first, the same for all three (allocator, optimizer state, caches)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "amp"], default=None, help="default fp32 on CPU, amp on CUDA")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--torchcompile", action="store_true", help="also ours and bare with the towers compiled (inductor)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.precision = a.precision or ("amp" if device.type == "cuda" else "fp32")
    a.vision, a.text = ("ViT-Tiny", "RBT-Tiny") if a.quick else ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese")
    a.steps = a.steps or (5 if a.quick else 3)
    config = ModelConfig(a.vision, a.text)
    torch.manual_seed(0)
    model = build_model(config)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split = make_lmdb(tmp / "lmdb", a.batch_size * (a.steps + a.warmup_steps + 1), np.random.default_rng(0))
        ckpt = save_checkpoint(tmp / "start.pt", sd, config)
        t = {}
        t["upstream"] = run_upstream(model, sd, config.image_resolution, split, a, device)
        print(f"upstream: {t['upstream']:.3f} s/step", file=sys.stderr, flush=True)
        t["bare"] = run_bare(model, sd, config, split, a, device)
        print(f"bare: {t['bare']:.3f} s/step", file=sys.stderr, flush=True)
        if a.torchcompile:
            t["bare+compile"] = run_bare(model, sd, config, split, a, device, compile_model=True)
            print(f"bare+compile: {t['bare+compile']:.3f} s/step", file=sys.stderr, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t["ours"] = run_ours(ckpt, split, a, device, tmp / "logs")
        print(f"ours: {t['ours']:.3f} s/step", file=sys.stderr, flush=True)
        if a.torchcompile:
            t["ours+compile"] = run_ours(ckpt, split, a, device, tmp / "logs", ("--torchcompile",), "ours_compile")
    res = {
        "model": config.arch,
        "device": str(device),
        "precision": a.precision,
        "batch_size": a.batch_size,
        "steps": a.steps,
        "warmup_steps": a.warmup_steps,
        "threads": torch.get_num_threads(),
        **{f"{k}_s_per_step": v for k, v in t.items()},
        **{f"{k}_pairs_per_s": a.batch_size / v for k, v in t.items()},
        "speedup_vs_upstream": t["upstream"] / t["ours"],
        "ours_overhead_vs_bare": t["ours"] / t["bare"] - 1,
        **({"compiled_speedup_vs_upstream": t["upstream"] / t["ours+compile"]} if a.torchcompile else {}),
    }
    print(f"training step, {config.arch}, {device} {a.precision}, batch {a.batch_size}, {a.steps} timed steps")
    print(f"{'':10s} {'s/step':>9s} {'pairs/s':>9s}")
    for k in t:
        print(f"{k:12s} {t[k]:9.3f} {a.batch_size / t[k]:9.2f}   {t['upstream'] / t[k]:.2f}x upstream")
    print(
        f"ours/upstream throughput ratio: {res['speedup_vs_upstream']:.2f}x; "
        f"our loop's overhead over a bare step: {100 * res['ours_overhead_vs_bare']:+.1f}%"
    )
    if a.torchcompile:
        print(
            f"ours+compile/upstream throughput ratio: {res['compiled_speedup_vs_upstream']:.2f}x (compile time "
            "left out: it is logged by the trainer)"
        )
    if a.out:
        write_json(a.out, res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])

"""Training step throughput: our trainer vs cn_clip's ``cn_clip.training.train.train``, interleaved step by step.

Same random-weight model (ViT-B-16 + RoBERTa-wwm-ext-base-chinese; ``--quick``: ViT-Tiny + RBT-Tiny), same
batch size, precision and AdamW settings, each from the same weights. Our real trainer (``solution.train``:
our data path, texts cut to the longest in the batch, logging) runs warm-up + N steps; before each of its
steps, one step of each other variant runs, so each round times one step of every variant under the same load:

- ``upstream``: cn_clip's own ``train()`` for one step over an LMDB of one batch (its DataLoader, texts padded
  to 52 tokens, the model in DDP as it expects; on CPU via ``cn_clip_patch.device.on_device``);
- ``bare``: the same model, forward + CLIP loss + backward + AdamW on batches already in memory (our
  tokenisation): the floor any loop can reach;
- ``ours``: the time from the end of one such round to the next, i.e. our loop's step with its data loading.

With ``--torchcompile`` a second trainer run compiles the towers (``ours+compile``) beside ``bare+compile`` and
upstream. Each ratio is the median over rounds, with its spread (interquartile range / median); a spread over
20% is flagged: the machine's load changed during the run, rerun it.

    python scripts/bench_train.py [--quick] [--device cpu|cuda] [--rounds 5] [--batch-size 8] [--torchcompile] [--out FILE]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import statistics
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
from solution.common import resolve_device, write_json
from solution.data.lmdb_io import write_split
from solution.model import ModelConfig, build_model, save_checkpoint
from solution.model.compiled import CompileClock, compile_seconds, compile_towers
from solution.model.precision import autocast
from solution.training.step import clip_loss

CHARS = (
    "连衣裙男士运动鞋透气轻便夏季新款苹果手机壳儿童玩具车保温杯红色白色黑色纯棉短袖长袖女装"
    "家用厨房收纳盒办公椅实木书桌蓝牙耳机无线充电宝大容量防水户外登山背包"
)
SPREAD_WARNING = 0.20


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


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def upstream_step(stack: contextlib.ExitStack, model, sd, res: int, split: Path, a, device):
    """One step of cn_clip's ``train()`` per call, over ``split`` (one batch of pairs); the contexts it needs
    (device redirection, a one-process group) stay entered in ``stack``."""
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
        max_steps=10**6,
        logs=None,
        name="bench",
    )
    if device.type == "cpu":
        stack.enter_context(on_device(device))
    # upstream reads the image size from its own config folder; ViT-Tiny lives in ours
    stack.enter_context(mock.patch("cn_clip.training.data.fetch_resolution", lambda name: res))
    stack.enter_context(single_process_group("gloo" if device.type == "cpu" else "nccl"))
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=None if device.type == "cpu" else [device.index or 0]
    )
    data = get_data(args, epoch_id=0, max_txt_length=52)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    sched = cosine_lr(opt, 1e-5, 1, 100)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" else None
    return lambda: train(ddp, data, 0, opt, scaler, sched, args, 0)


def bare_step(sd, config, split: Path, a, device, compile_model: bool = False):
    """One plain step per call (forward, CLIP loss, backward, AdamW) on batches already on the device."""
    from solution.training.loaders import open_split, train_loader

    model = build_model(config)
    model.load_state_dict(sd)
    model.to(device).train()
    if compile_model:
        compile_towers(model, device)
    cfg = SimpleNamespace(model_config=config, augment="none", batch_size=a.batch_size, seed=123, num_workers=0)
    loader = train_loader(open_split(str(split), "bench"), cfg, rank=0, world=1)
    loader.batch_sampler.set_epoch(0)
    batches = [(im.to(device), tok.to(device)) for im, tok, _, _ in loader]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    scaler = torch.amp.GradScaler("cuda") if a.precision == "amp" and device.type == "cuda" else None
    turn = iter(range(10**9))

    def step():
        images, tokens = batches[next(turn) % len(batches)]
        opt.zero_grad(set_to_none=True)
        with autocast(device, a.precision):
            img, txt, scale = model(images, tokens)
            loss, _ = clip_loss(img, txt, scale, None)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    return step


def run_ours(ckpt: Path, split: Path, a, device, logs: Path, between: dict | None = None, extra=(), name="ours"):
    """Our trainer for warm-up + ``a.steps`` steps; before each of its steps one call of each of ``between``
    (outside our model math). Seconds per timed round of ``ours`` and of each of ``between`` (compile left out)."""
    from solution.training import trainer

    between, times, mark = between or {}, {"ours": [], **{k: [] for k in between or {}}}, [None]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # as upstream runs
    real = trainer.Stepper.__call__

    def round_robin(self, batches):
        _sync(device)
        if mark[0] is not None:
            times["ours"].append(time.perf_counter() - mark[0][0] - (compile_seconds() - mark[0][1]))
        ours = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for k, fn in between.items():
            clock, t = CompileClock(), time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t - clock.lap())
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = ours
        mark[0] = time.perf_counter(), compile_seconds()
        return real(self, batches)

    argv = f"--train-data {split} --resume {ckpt} --reset-data-offset --reset-optimizer --logs {logs} --name {name}"
    argv += f" --batch-size {a.batch_size} --max-steps {a.steps + a.warmup_steps + 1} --lr 1e-5 --warmup 1"
    argv += f" --num-workers 0 --precision {a.precision} --device {device} --log-interval 1 --no-progress --no-plot"
    argv += " --save-epoch-frequency 0 --valid-epoch-interval 0"
    with mock.patch.object(trainer.Stepper, "__call__", round_robin):
        trainer.main(argv.split() + list(extra))
    return {k: v[a.warmup_steps : a.warmup_steps + a.steps] for k, v in times.items()}


def summary(rounds: list[float]) -> tuple[float, float]:
    """The median of per-round values and their spread (interquartile range / median)."""
    q1, med, q3 = statistics.quantiles(rounds, n=4, method="inclusive") if len(rounds) > 1 else rounds * 3
    return med, (q3 - q1) / med


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ViT-Tiny + RBT-Tiny (seconds) instead of ViT-B-16 + RoBERTa")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", "--steps", dest="steps", type=int, default=None, help="timed rounds (default 5)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed rounds first (allocator, optimizer, caches)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "amp"], default=None, help="default fp32 on CPU, amp on CUDA")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--torchcompile", action="store_true", help="also ours and bare with the towers compiled")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.precision = a.precision or ("amp" if device.type == "cuda" else "fp32")
    a.vision, a.text = ("ViT-Tiny", "RBT-Tiny") if a.quick else ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese")
    a.steps = a.steps or 5
    config = ModelConfig(a.vision, a.text)
    torch.manual_seed(0)
    model = build_model(config)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp, rng = Path(tmp), np.random.default_rng(0)
        split = make_lmdb(tmp / "lmdb", a.batch_size * (a.steps + a.warmup_steps + 2), rng)
        one_batch = make_lmdb(tmp / "lmdb1", a.batch_size, rng)
        ckpt = save_checkpoint(tmp / "start.pt", sd, config)
        others = {"upstream": upstream_step(stack, model, sd, config.image_resolution, one_batch, a, device)}
        rounds = run_ours(
            ckpt, split, a, device, tmp / "logs", {**others, "bare": bare_step(sd, config, split, a, device)}
        )
        if a.torchcompile:
            others["bare+compile"] = bare_step(sd, config, split, a, device, compile_model=True)
            compiled = run_ours(ckpt, split, a, device, tmp / "logs", others, ["--torchcompile"], "ours_compile")
            rounds.update({"ours+compile": compiled["ours"], "bare+compile": compiled["bare+compile"]})
            rounds["upstream(compile run)"] = compiled["upstream"]
    ratios = {
        "upstream / ours": [u / o for u, o in zip(rounds["upstream"], rounds["ours"])],
        "ours / bare": [o / b for o, b in zip(rounds["ours"], rounds["bare"])],
    }
    if a.torchcompile:
        pairs = zip(rounds["upstream(compile run)"], rounds["ours+compile"])
        ratios["upstream / ours+compile"] = [u / o for u, o in pairs]
    print(f"training step, {config.arch}, {device} {a.precision}, batch {a.batch_size}, {a.steps} interleaved rounds")
    print(f"{'':22s} {'s/step':>9s} {'pairs/s':>9s} {'spread':>7s}")
    for k, v in rounds.items():
        med, spread = summary(v)
        print(f"{k:22s} {med:9.3f} {a.batch_size / med:9.2f} {100 * spread:6.0f}%")
    res = {"model": config.arch, "device": str(device), "precision": a.precision, "batch_size": a.batch_size}
    res.update(rounds=a.steps, warmup_rounds=a.warmup_steps, threads=torch.get_num_threads())
    res.update({f"{k}_s_per_step": summary(v)[0] for k, v in rounds.items()})
    for k, v in ratios.items():
        med, spread = summary(v)
        warn = (
            "  WARNING: spread over 20%: the load changed during the run, rerun it" if spread > SPREAD_WARNING else ""
        )
        print(f"{k}: median {med:.2f}x (spread {100 * spread:.0f}% over rounds){warn}")
        res.update({k: med, f"{k} spread": spread})
    if a.out:
        write_json(a.out, res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])

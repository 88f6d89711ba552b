"""One-command accelerator check: every path a competitor runs, ours beside upstream's, in one run.

On one GPU (under 8 minutes on an H200), for ViT-B-16 and ViT-H-14 (``--quick``: ViT-Tiny + RBT-Tiny,
tiny sizes, well under a minute on a CPU):

- train: the largest batch that fits (doubling search, out-of-memory caught) for a training step
  with upstream's attention and fp16 AMP; at that batch, our trainer (``solution.train``) beside
  cn_clip's own ``train()`` (both read the same LMDB with 0 workers; see ``bench_train.py``), then
  bare steps on batches in memory: upstream's step (hand-written BERT attention, texts padded to
  52, plain AdamW) beside ours with fp16 AMP (SDPA text tower, texts cut to the longest, fused
  AdamW on CUDA), bf16, LoRA, gradient checkpointing (upstream: its own ``set_grad_checkpointing``)
  and ``--torchcompile``'s ``compile_towers`` (compile time logged, kept out of the step time; on a CPU
  with the ``eager`` backend: graph capture only);
- 2-process DDP of our trainer when two GPUs exist (a ``skipped`` line otherwise);
- feature extraction images/s and texts/s: ``solution.features`` beside cn_clip's
  ``extract_features.py`` (run through ``cn_clip_patch.device.on_device``), and again with
  ``--torchcompile`` (its compile seconds left out of the rate, shown in the note);
- predict at MUGE scale (5,008 x 29,806 random features): ``solution.predict`` beside a plain torch
  matmul + topk;
- a soup of two ViT-H-14 checkpoints (random weights): ``solution.soup`` beside loading both and
  averaging (peak RSS of each, in a subprocess).

CUDA regions are timed between ``torch.cuda.synchronize`` calls and their
``torch.cuda.max_memory_allocated`` recorded. Each case is isolated: an exception becomes a
``failed: <one line>`` row and the run goes on; the exit code is 1 if any case failed. Writes
``OUT/GPU.md`` (case, ours, upstream, ratio, peak memory) and ``OUT/GPU.json``.

    bash scripts/gpu_check.sh [--quick] [--device cuda] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_features
import bench_predict
import bench_soup
import bench_train

from cn_clip_patch.attention import use_sdpa
from cn_clip_patch.device import on_device, run_upstream_main
from cn_clip_patch.tuning import apply_tuning, grad_checkpointing, tuning_recipe
from solution.common import resolve_device, write_json
from solution.model import ModelConfig, build_model
from solution.model.compiled import compile_towers
from solution.model.precision import autocast
from solution.training.step import clip_loss

log = logging.getLogger("gpu_check")
GIB = 1024**3
DDP = "train DDP, 2 processes"
GROUPS = ["train", "ddp", "features", "predict", "soup"]
TEXT = {"ViT-B-16": "RoBERTa-wwm-ext-base-chinese", "ViT-H-14": "RoBERTa-wwm-ext-large-chinese"}


class Report:
    """The rows of the table; ``case`` runs one isolated case and records a failure as a row."""

    def __init__(self, device):
        self.device, self.rows = device, []

    def add(self, case, ours, upstream=None, unit="", peak=(None, None), note=""):
        ratio = None if not upstream else upstream / ours if unit == "s" else ours / upstream  # > 1: ours better
        self.rows.append(
            {
                "case": case,
                "ours": ours,
                "upstream": upstream,
                "unit": unit,
                "ratio": ratio,
                "peak_ours_gib": peak[0],
                "peak_upstream_gib": peak[1],
                "note": note,
            }
        )
        log.info("%s: ours %.4g, upstream %s %s", case, ours, "-" if upstream is None else f"{upstream:.4g}", unit)

    def skip(self, case, why):
        self.rows.append({"case": case, "skipped": why})
        log.info("%s: skipped (%s)", case, why)

    def case(self, name, fn, *args):
        try:
            return fn(self, *args)
        except Exception as e:  # isolated: one line in the table, the run goes on
            line = (str(e).strip().splitlines() or [""])[0][:200]
            self.rows.append({"case": name, "failed": f"{type(e).__name__}: {line}"})
            log.exception("%s failed", name)
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def failed(self):
        return [r for r in self.rows if "failed" in r]

    def write(self, out: Path, meta: dict):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "GPU.json", {**meta, "rows": self.rows})
        lines = [
            f"# Accelerator check: {meta['device_name']}",
            "",
            f"{meta['device']}, torch {meta['torch']}, {'quick' if meta['quick'] else 'full'} run, "
            f"{meta['seconds']:.0f} s. Ratio > 1: ours better (rates: ours / upstream; seconds: upstream / ours).",
            "",
            "| case | ours | upstream | ratio | peak memory (ours / upstream) |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            if "failed" in r or "skipped" in r:
                what = f"failed: {r['failed']}" if "failed" in r else f"skipped: {r['skipped']}"
                lines.append(f"| {r['case']} | {what} | | | |")
                continue
            up = "-" if r["upstream"] is None else f"{r['upstream']:.4g} {r['unit']}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            peak = " / ".join(
                "-" if p is None else f"{p:.2f} GiB" for p in (r["peak_ours_gib"], r["peak_upstream_gib"])
            )
            note = f" ({r['note']})" if r["note"] else ""
            lines.append(f"| {r['case']}{note} | {r['ours']:.4g} {r['unit']} | {up} | {ratio} | {peak} |")
        (out / "GPU.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def compile_backend(device) -> str:
    """inductor on a GPU (what --torchcompile runs); on a CPU eager (graph capture only: seconds, not minutes)."""
    return "inductor" if device.type == "cuda" else "eager"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device):
    """``with timed(dev) as t:``; then ``t.seconds`` and ``t.peak_gib`` (CUDA ``max_memory_allocated``, else None)."""
    t = SimpleNamespace(seconds=None, peak_gib=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    yield t
    sync(device)
    t.seconds = time.perf_counter() - t0
    if device.type == "cuda":
        t.peak_gib = torch.cuda.max_memory_allocated(device) / GIB


# ---------------------------------------------------------------- training steps


def fresh(config, sd, device):
    with torch.device(device):
        model = build_model(config, device)
    model.load_state_dict(sd)
    return model.train()


def batches(config, batch, n, device, pad_to=None, seed=0):
    """``n`` random (images, token ids) batches: 4-16 character texts, padded to the longest or ``pad_to``."""
    g = torch.Generator().manual_seed(seed)
    res, vocab = config.image_resolution, config.model_info["vocab_size"]
    out = []
    for _ in range(n):
        lens = torch.randint(6, 19, (batch,), generator=g)
        tokens = torch.zeros(batch, pad_to or int(lens.max()), dtype=torch.long)
        for i, k in enumerate(lens.tolist()):
            tokens[i, :k] = torch.randint(1000, vocab, (k,), generator=g)
        out.append((torch.randn(batch, 3, res, res, generator=g).to(device), tokens.to(device)))
    return out


def step_time(model, data, device, precision, warmup, fused=False):
    """Seconds per step of forward + CLIP loss + backward + AdamW over ``data``, after ``warmup`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=1e-5,
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.2,
        **({"fused": True} if fused and device.type == "cuda" else {}),
    )
    scaler = torch.amp.GradScaler("cuda") if precision == "amp" and device.type == "cuda" else None

    def step(images, tokens):
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            img, txt, scale = model(images, tokens)
        loss, _ = clip_loss(img.float(), txt.float(), scale.float(), None)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    with timed(device) as w:
        for images, tokens in data[:warmup]:
            step(images, tokens)
    log.info("warm-up (%d steps, compile included where compiled): %.1f s", warmup, w.seconds)
    with timed(device) as t:
        for images, tokens in data[warmup:]:
            step(images, tokens)
    return t.seconds / (len(data) - warmup), t.peak_gib


def largest_batch(config, sd, device, start, cap, precision):
    """Doubling search: the largest batch (``start`` * 2^k <= ``cap``) whose upstream-attention step fits."""
    fits, batch = None, start
    while batch <= cap:
        try:
            model = fresh(config, sd, device)
            step_time(model, batches(config, batch, 2, device, pad_to=52), device, precision, 1)
            fits = batch
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    if fits is None:
        raise RuntimeError(f"batch {start} does not fit")
    return fits


def variant(config, sd, device, kind):
    """A fresh model set up as ``kind`` wants (our SDPA text tower unless ``upstream``)."""
    model = fresh(config, sd, device)
    use_sdpa(model, not kind.startswith("upstream"))
    if kind == "lora":
        apply_tuning(model, tuning_recipe(lora_rank=8))
    return model


def train_case(report, arch, config, sd, device, a, batch):
    """Bare steps at ``batch``: upstream's step (and its grad checkpointing) beside each of our variants."""
    n = a.warmup + a.steps
    up_data, our_data = batches(config, batch, n, device, pad_to=52), batches(config, batch, n, device)
    amp = "amp" if device.type == "cuda" else "fp32"
    up = report.case(
        f"train {arch} upstream step",
        lambda r: step_time(variant(config, sd, device, "upstream"), up_data, device, amp, a.warmup),
    )
    up_ck = report.case(
        f"train {arch} upstream grad checkpointing", _upstream_ckpt, config, sd, device, a, up_data, amp
    )
    backend = compile_backend(device)
    cases = [
        ("amp", "ours", amp, up),
        ("bf16", "ours", "bf16", up),
        ("LoRA", "lora", amp, up),
        ("grad checkpointing", "ckpt", amp, up_ck),
        ("torch.compile", "compile", amp, up),
    ]
    fixed = batches(config, batch, n, device, pad_to=18)  # one text length: no recompiles inside the timed steps
    for label, kind, precision, ref in cases:
        note = f"batch {batch}, {precision}" + (f", {backend}, texts padded to 18" if kind == "compile" else "")
        report.case(
            f"train {arch} step: {label}",
            _our_step,
            f"train {arch} step: {label}",
            config,
            sd,
            device,
            a,
            fixed if kind == "compile" else our_data,
            kind,
            precision,
            ref,
            note,
        )


def _upstream_ckpt(report, config, sd, device, a, data, precision):
    model = variant(config, sd, device, "upstream")
    model.set_grad_checkpointing(True)  # upstream's own (reentrant) checkpointing
    return step_time(model, data, device, precision, a.warmup)


def _our_step(report, case, config, sd, device, a, data, kind, precision, ref, note):
    if ref is None:
        raise RuntimeError("upstream's step failed; nothing to compare with")
    model = variant(config, sd, device, kind)
    if kind == "compile":  # --torchcompile's own code (both towers in place); its time: the warm-up log line
        compile_towers(model, device, compile_backend(device))
    with grad_checkpointing(model) if kind == "ckpt" else contextlib.nullcontext():
        s, peak = step_time(model, data, device, precision, a.warmup, fused=True)
    batch = len(data[0][1])
    report.add(case, batch / s, batch / ref[0], "pairs/s", (peak, ref[1]), note=note)


def trainer_case(report, arch, config, sd, device, a, batch, tmp: Path):
    """Our trainer (data path included) beside cn_clip's ``train()`` on the same LMDB (``bench_train``)."""
    from solution.model import save_checkpoint

    split = make_lmdb(tmp / f"lmdb_{arch}", batch * (a.steps + a.warmup + 2))
    one_batch = make_lmdb(tmp / f"lmdb1_{arch}", batch)
    ckpt = save_checkpoint(tmp / f"start_{arch}.pt", {k: v.cpu() for k, v in sd.items()}, config)
    ba = SimpleNamespace(
        batch_size=batch,
        vision=config.vision_model,
        precision="amp" if device.type == "cuda" else "fp32",
        warmup_steps=a.warmup,
        steps=a.steps,
    )
    model = fresh(config, sd, device)  # one model at a time (the batch is the largest that fits one): not interleaved
    with contextlib.ExitStack() as stack:
        step = bench_train.upstream_step(stack, model, sd, config.image_resolution, one_batch, ba, device)
        for _ in range(a.warmup):
            step()
        with timed(device) as tu:
            for _ in range(a.steps):
                step()
    up = tu.seconds / a.steps
    del model, step
    gc.collect()
    with timed(device) as to:
        ours = statistics.median(bench_train.run_ours(ckpt, split, ba, device, tmp / f"logs_{arch}")["ours"])
    report.add(
        f"train {arch}: our trainer vs cn_clip train()",
        batch / ours,
        batch / up,
        "pairs/s",
        (to.peak_gib, tu.peak_gib),
        note=f"batch {batch}, {ba.precision}",
    )


def make_lmdb(d: Path, n: int) -> Path:
    """``n`` small JPEG pairs (decoding stays cheap beside the step)."""
    import base64

    from PIL import Image

    from solution.data.lmdb_io import write_split

    rng = np.random.default_rng(0)
    images, pairs = [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
        images.append((1_000 + i, base64.urlsafe_b64encode(buf.getvalue())))
        pairs.append((1_000 + i, 5_000 + i, "".join(rng.choice(list(bench_train.CHARS), int(rng.integers(4, 17))))))
    write_split(d, images, pairs)
    return d


def ddp_case(report, device, a, tmp: Path):
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return report.skip(DDP, f"{torch.cuda.device_count() if device.type == 'cuda' else 0} GPU(s)")
    config = ModelConfig("ViT-B-16", TEXT["ViT-B-16"])
    torch.manual_seed(0)
    from solution.model import save_checkpoint

    ckpt = save_checkpoint(tmp / "ddp.pt", build_model(config).state_dict(), config)
    split, batch, steps = make_lmdb(tmp / "lmdb_ddp", 64 * 2 * 8), 64, 6
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "solution.train",
        "--train-data",
        str(split),
        "--resume",
        str(ckpt),
        "--reset-data-offset",
        "--reset-optimizer",
        "--logs",
        str(tmp / "ddp_logs"),
        "--name",
        "ddp",
        "--batch-size",
        str(batch),
        "--max-steps",
        str(steps),
        "--num-workers",
        "2",
        "--log-interval",
        "1",
        "--no-progress",
        "--no-plot",
        "--save-epoch-frequency",
        "0",
        "--valid-epoch-interval",
        "0",
    ]
    proc = subprocess.run(cmd, timeout=240, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"torchrun exited {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1])
    rows = [json.loads(x) for x in open(tmp / "ddp_logs" / "ddp" / "metrics.jsonl", encoding="utf-8")]
    stamps = [r["time"] for r in rows if r["kind"] == "train"]
    per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    report.add(DDP, 2 * batch / per_step, None, "pairs/s", note=f"ViT-B-16, batch {batch} per GPU, our trainer")


# ---------------------------------------------------------------- features, predict, soup


def tiny_shadow(d: Path) -> tuple[ModelConfig, list[str]]:
    """``--quick``: a tiny model under names upstream's script knows (it reads their JSONs beside its own file).

    A shadow tree of its unmodified ``extract_features.py`` (symlinked) and our tiny configs as
    ``ViT-B-16.json`` (224 pixels, so upstream's resolution lookup stays right) and ``RBT3-chinese.json``.
    """
    import cn_clip

    info = {**ModelConfig("ViT-Tiny", "RBT-Tiny").model_info, "image_resolution": 224, "vision_patch_size": 32}
    (d / "shadow/eval").mkdir(parents=True)
    (d / "shadow/clip/model_configs").mkdir(parents=True)
    os.symlink(Path(cn_clip.__file__).parent / "eval/extract_features.py", d / "shadow/eval/extract_features.py")
    vision = {k: v for k, v in info.items() if k.startswith("vision") or k in ("embed_dim", "image_resolution")}
    (d / "shadow/clip/model_configs/ViT-B-16.json").write_text(json.dumps(vision))
    (d / "shadow/clip/model_configs/RBT3-chinese.json").write_text(
        json.dumps({k: v for k, v in info.items() if k not in vision})
    )
    return ModelConfig("ViT-Tiny", "RBT-Tiny", model_info=info), ["ViT-B-16", "RBT3-chinese"]


def upstream_features(argv, device, shadow: Path | None) -> tuple[float, float]:
    """cn_clip's ``extract_features.py`` on ``device``: seconds of its text loop and of its image loop."""
    import runpy

    saved, bench_features.tqdm_pkg.tqdm = bench_features.tqdm_pkg.tqdm, bench_features.TimedLoops
    bench_features.TimedLoops.loops = []
    saved_argv = sys.argv
    try:
        if shadow is None:
            run_upstream_main("cn_clip.eval.extract_features", argv, device=device)
        else:
            sys.argv = ["extract_features.py", *argv]
            with on_device(device), contextlib.redirect_stdout(io.StringIO()):
                runpy.run_path(str(shadow / "eval/extract_features.py"), run_name="__main__")
    finally:
        bench_features.tqdm_pkg.tqdm, sys.argv = saved, saved_argv
    (text_s, _), (image_s, _) = bench_features.TimedLoops.loops  # upstream does texts first, then images
    return text_s, image_s


def features_case(report, device, a, tmp: Path):
    """``solution.features`` beside cn_clip's ``extract_features.py`` (same checkpoint, data, precision)."""
    from solution.features import main as features_main
    from solution.model import save_checkpoint

    d = tmp / "feats"
    d.mkdir()
    bench_features.make_data(d, a.images, a.texts, np.random.default_rng(0))
    if a.quick:
        config, names = tiny_shadow(d)
    else:
        config, names = ModelConfig(*a.archs[0]), list(a.archs[0])
    torch.manual_seed(0)
    save_checkpoint(d / "random.pt", build_model(config).state_dict(), config)
    precision = "fp16" if device.type == "cuda" else "fp32"
    common = bench_features.common_argv(d, precision, a.feat_batch, a.feat_batch)
    common += ["--extract-text-feats", "--extract-image-feats"]
    with timed(device) as tu:
        up_text, up_image = upstream_features(
            [
                *common,
                "--vision-model",
                names[0],
                "--text-model",
                names[1],
                "--text-feat-output-path",
                str(d / "up_txt.jsonl"),
                "--image-feat-output-path",
                str(d / "up_img.jsonl"),
            ],
            device,
            d / "shadow" if a.quick else None,
        )
    with timed(device) as to:
        r = features_main(
            [
                *common,
                "--device",
                str(device),
                "--no-progress",
                "--no-cache",
                "--text-feat-output-path",
                str(d / "txt.npy"),
                "--image-feat-output-path",
                str(d / "img.npy"),
            ]
        )
    peak, note = (to.peak_gib, tu.peak_gib), f"{config.arch}, {precision}"
    report.add("features images/s", a.images / r["image"]["seconds"], a.images / up_image, "images/s", peak, note)
    report.add("features texts/s", a.texts / r["text"]["seconds"], a.texts / up_text, "texts/s", peak, note)
    with timed(device) as tc:  # --torchcompile: its compile seconds logged and left out of the rates
        c = features_main(
            [
                *common,
                "--device",
                str(device),
                "--no-progress",
                "--no-cache",
                "--torchcompile",
                "--torchcompile-backend",
                compile_backend(device),
                "--text-feat-output-path",
                str(d / "txt_c.npy"),
                "--image-feat-output-path",
                str(d / "img_c.npy"),
            ]
        )
    for kind, n, up in (("image", a.images, up_image), ("text", a.texts, up_text)):
        spent = c[kind]["compile_seconds"]
        report.add(
            f"features {kind}s/s, torch.compile",
            n / max(c[kind]["seconds"] - spent, 1e-9),
            n / up,
            f"{kind}s/s",
            (tc.peak_gib, tu.peak_gib),
            f"{note}, {compile_backend(device)}, compile {spent:.1f} s left out",
        )


def predict_case(report, device, a, tmp: Path):
    """``solution.predict`` (read, rank, write) beside a plain torch matmul + topk on the same features."""
    from solution.formats.feature_files import save_features
    from solution.predict import main as predict_main

    rng = np.random.default_rng(0)
    texts, images = (bench_predict.unit(rng, n, 512) for n in (a.queries, a.gallery))
    tids, iids = np.arange(a.queries, dtype=np.int64), np.arange(a.gallery, dtype=np.int64) + 10**6
    save_features(tmp / "t.npy", "text", tids, texts)
    save_features(tmp / "i.npy", "image", iids, images)
    with timed(device) as to:
        predict_main(
            [
                "--image-feats",
                str(tmp / "i.npy"),
                "--text-feats",
                str(tmp / "t.npy"),
                "--top-k",
                "10",
                "--output",
                str(tmp / "sub.jsonl"),
                "--device",
                str(device),
                "--no-progress",
            ]
        )
    with timed(device) as tb:
        t, i = torch.from_numpy(np.load(tmp / "t.npy")).to(device), torch.from_numpy(np.load(tmp / "i.npy")).to(device)
        with open(tmp / "base.jsonl", "w", encoding="utf-8") as f:
            for s in range(0, len(t), 1024):
                top = (t[s : s + 1024] @ i.T).topk(10, dim=1).indices.cpu().numpy()
                f.writelines(
                    json.dumps({"text_id": int(q), "image_ids": iids[row].tolist()}) + "\n"
                    for q, row in zip(tids[s : s + 1024], top)
                )
    report.add(
        "predict top-10",
        to.seconds,
        tb.seconds,
        "s",
        (to.peak_gib, tb.peak_gib),
        note=f"{a.queries} x {a.gallery}; baseline: plain torch matmul + topk",
    )


def soup_case(report, device, a, tmp: Path):
    """Two random fp16 checkpoints: ``solution.soup`` (uniform, no scoring) beside torch.load-both-and-average."""
    vision, text = a.archs[-1]
    d = tmp / "soup"
    d.mkdir()
    paths, _ = bench_soup.make_checkpoints(d, vision, text, 2)
    paths = [str(p) for p in paths]
    ours = bench_soup.measure(
        [
            sys.executable,
            "-c",
            bench_soup.OURS,
            "--checkpoints",
            *paths,
            "--method",
            "uniform",
            "--no-score",
            "--output",
            str(d / "out"),
        ]
    )
    naive = bench_soup.measure([sys.executable, "-c", bench_soup.NAIVE, *paths, str(d / "naive.pt")])
    report.add(
        "soup of 2 checkpoints",
        ours["seconds"],
        naive["seconds"],
        "s",
        (ours["peak_rss_gb"], naive["peak_rss_gb"]),
        note=f"{vision}; baseline: load both + average; peak: process RSS",
    )


# ---------------------------------------------------------------- main


def train_arch(report, device, a, vision, text, tmp):
    arch = vision
    config = ModelConfig(vision, text)
    torch.manual_seed(0)
    sd = {k: v.to(device) for k, v in build_model(config).state_dict().items()}
    precision = "amp" if device.type == "cuda" else "fp32"
    batch = largest_batch(config, sd, device, a.batch_start, a.batch_cap, precision)
    log.info("%s: largest batch that fits (cap %d): %d", arch, a.batch_cap, batch)
    report.case(f"train {arch}: our trainer vs cn_clip train()", trainer_case, arch, config, sd, device, a, batch, tmp)
    train_case(report, arch, config, sd, device, a, batch)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny configs and sizes (the test suite runs this on CPU)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    p.add_argument("--out", default="runs/bench", help="folder for GPU.md and GPU.json")
    p.add_argument("--steps", type=int, default=None, help="timed steps per training case (default 3; 1 with --quick)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first, compile included (default 2; 1 with --quick)"
    )
    p.add_argument("--only", nargs="+", choices=GROUPS, default=GROUPS, help="run these groups of cases only")
    p.add_argument("--archs", nargs="+", choices=list(TEXT), default=None, help="training: these vision towers only")
    p.add_argument("--batch-cap", type=int, default=None, help="largest batch tried (default 256; 2 with --quick)")
    return p


def configure(a):
    if a.quick:
        a.archs = [("ViT-Tiny", "RBT-Tiny")]
        a.batch_start, a.steps, a.warmup = 2, a.steps or 1, a.warmup or 1
        a.batch_cap = a.batch_cap or 2
        a.images, a.texts, a.feat_batch, a.queries, a.gallery = 8, 32, 8, 50, 300
    else:
        a.archs = [(v, TEXT[v]) for v in (a.archs or TEXT)]
        a.batch_start, a.steps, a.warmup = 16, a.steps or 3, a.warmup or 2
        a.batch_cap = a.batch_cap or 256
        a.images, a.texts, a.feat_batch, a.queries, a.gallery = 512, 4096, 256, 5008, 29806
    return a


def main(argv=None) -> int:
    a = configure(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("cn_clip", "solution"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = resolve_device(a.device)
    report, t0 = Report(device), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        for vision, text in a.archs if "train" in a.only else []:
            report.case(f"train {vision} batch search", train_arch, device, a, vision, text, tmp)
        for group, fn in (
            ("ddp", ddp_case),
            ("features", features_case),
            ("predict", predict_case),
            ("soup", soup_case),
        ):
            if group in a.only:
                report.case(DDP if group == "ddp" else group, fn, device, a, tmp)
    meta = {
        "device": str(device),
        "quick": a.quick,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t0,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
    }
    report.write(Path(a.out), meta)
    for r in report.failed:
        log.error("%s: %s", r["case"], r["failed"])
    log.info(
        "wrote %s (%d rows, %d failed) in %.0f s",
        Path(a.out) / "GPU.md",
        len(report.rows),
        len(report.failed),
        meta["seconds"],
    )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

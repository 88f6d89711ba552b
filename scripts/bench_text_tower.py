"""Text-tower attention speed: upstream's hand-written BERT attention vs ours (SDPA), CPU.

RoBERTa-wwm-ext-base-chinese text tower at full size with random weights (the image tower is the
tiny test ViT: it is not timed), a batch of MUGE-length Chinese queries (10-30 characters, drawn
from a fixed list of product words) tokenised by ``cn_clip_patch.prompt.tokenize`` (upstream's
tokenizer, batch cut to its longest text, so padding is masked as in training). One model object
is switched between the two implementations with ``cn_clip_patch.attention.use_sdpa``, so both
run the same weights. Measured, in interleaved rounds (order alternating), medians reported:

- train step: ``model.train()`` + ``encode_text`` + backward (attention dropout as configured, 0.1,
  and once more with every dropout at 0, where CPU SDPA can use its fused kernel);
- feature extraction: ``model.eval()`` + ``torch.no_grad()`` + ``encode_text``;
- the self-attention modules alone (fwd+bwd, once per layer): the only code the switch changes.

With ``--torchcompile``, a third variant: a copy of the model (same weights) on SDPA with its towers
compiled by ``solution.model.compiled.compile_towers`` (what ``--torchcompile`` runs: inductor),
on the train step (configured dropout) and extraction; its first call (the compile) is printed
apart and left out of the table, and its features' difference from upstream's is printed.

Each round times every variant once; a ratio is the median of the rounds' ratios, with its spread, and a spread
over 20% is flagged (the machine's load changed: rerun it).

The max abs difference of the eval features (and of the last hidden state over real tokens)
between the two is printed. No assertion on speed.

    python scripts/bench_text_tower.py [--quick] [--batch 64] [--rounds 5] [--threads N] [--torchcompile]

(upstream/SDPA > 1 means SDPA is faster)
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import statistics
import time

import torch
from bench_train import SPREAD_WARNING, summary

from cn_clip_patch.attention import use_sdpa
from cn_clip_patch.prompt import PAD_ID, tokenize
from solution.model import ModelConfig, build_model

log = logging.getLogger("bench_text_tower")

WORDS = (
    "连衣裙",
    "男士",
    "运动鞋",
    "透气",
    "轻便",
    "夏季",
    "新款",
    "苹果",
    "手机壳",
    "儿童",
    "玩具车",
    "保温杯",
    "红色",
    "白色",
    "黑色",
    "纯棉",
    "短袖",
    "长袖",
    "女装",
    "家用",
    "厨房",
    "收纳盒",
    "办公椅",
    "实木",
    "书桌",
    "蓝牙耳机",
    "无线",
    "充电宝",
    "大容量",
    "防水",
    "户外",
    "登山",
    "背包",
    "宽松",
    "显瘦",
    "碎花",
    "半身裙",
    "牛仔裤",
    "羽绒服",
    "加厚",
    "保暖",
    "卫衣",
    "休闲",
    "小白鞋",
    "婴儿",
    "奶瓶",
    "零食",
    "礼盒",
    "坚果",
    "口红",
    "面膜",
    "补水",
    "洗面奶",
    "不锈钢",
    "炒锅",
    "电饭煲",
    "智能",
    "手表",
    "跑步机",
    "瑜伽垫",
)


def make_texts(n: int, seed: int = 0) -> list[str]:
    """MUGE-like product queries of 10-30 characters."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target, text = rng.randint(10, 30), ""
        while len(text) < target:
            text += rng.choice(WORDS)
        texts.append(text[:target])
    return texts


def set_dropout(model: torch.nn.Module, p: float | None) -> dict:
    """Set every text-tower dropout to ``p`` (None: leave); returns the previous values."""
    before = {}
    for name, mod in model.bert.named_modules():
        if isinstance(mod, torch.nn.Dropout):
            before[name] = mod.p
            if p is not None:
                mod.p = p
    return before


def restore_dropout(model: torch.nn.Module, values: dict) -> None:
    for name, mod in model.bert.named_modules():
        if name in values:
            mod.p = values[name]


def train_step(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    model.train()
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    feats = model.encode_text(tokens)
    feats.square().mean().backward()
    return time.perf_counter() - t0


def extract(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.encode_text(tokens)
    return time.perf_counter() - t0


def attention_only(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Only the self-attention modules (layer 0's, once per layer), fwd+bwd, dropout off: where the switch acts."""
    att = model.bert.encoder.layer[0].attention.self
    cfg = model.bert_config
    g = torch.Generator(device=tokens.device).manual_seed(0)
    hidden = torch.randn(*tokens.shape, cfg.hidden_size, generator=g, device=tokens.device, requires_grad=True)
    mask = (1.0 - tokens.ne(PAD_ID).float()[:, None, None, :]) * -10000.0  # BertModel's extended mask
    was = att.training
    att.eval()
    t0 = time.perf_counter()
    for _ in range(cfg.num_hidden_layers):
        att(hidden, mask)[0].square().mean().backward()
    seconds = time.perf_counter() - t0
    att.train(was)
    return seconds


def output_difference(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[float, float]:
    """Max abs difference of eval features and of the last hidden state (real tokens only)."""
    model.eval()
    mask = tokens.ne(PAD_ID)
    outs = {}
    with torch.no_grad():
        for sdpa in (False, True):
            use_sdpa(model, sdpa)
            outs[sdpa] = (model.encode_text(tokens), model.bert(tokens, attention_mask=mask.float())[0])
    use_sdpa(model, False)
    feat = (outs[True][0] - outs[False][0]).abs().max().item()
    hidden = (outs[True][1] - outs[False][1])[mask].abs().max().item()
    return feat, hidden


VARIANTS = ("upstream", "SDPA", "SDPA+compile")


def _switch(models: dict, variant: str):
    """The model object of ``variant`` with its attention set (upstream and SDPA share one object)."""
    if variant == "SDPA+compile":
        return models["compiled"]
    use_sdpa(models["eager"], variant == "SDPA")
    return models["eager"]


def _compiled_copy(model: torch.nn.Module, device) -> torch.nn.Module:
    """A copy of ``model`` (same weights) on SDPA with its towers compiled by ``--torchcompile``'s code (inductor)."""
    from solution.model.compiled import compile_towers

    clone = copy.deepcopy(model)
    use_sdpa(clone, True)
    return compile_towers(clone, device)


def _time_rounds(models, cases, variants, rounds) -> tuple[dict, dict]:
    """Interleaved rounds (order rotating); round 0 warms up (and compiles) and is reported apart."""
    times = {(c[0], v): [] for c in cases for v in variants}
    warm = {}
    for rnd in range(rounds + 1):
        for what, fn, p, compiled_too in cases:
            vs = [v for v in variants if compiled_too or v != "SDPA+compile"]
            order = vs[rnd % len(vs) :] + vs[: rnd % len(vs)]
            for variant in order:
                model = _switch(models, variant)
                saved = set_dropout(model, p)
                seconds = fn(model, tokens_of(models))
                restore_dropout(model, saved)
                if rnd:
                    times[(what, variant)].append(seconds)
                else:
                    warm[(what, variant)] = seconds
        if rnd:
            log.info(
                "round %d/%d: %s",
                rnd,
                rounds,
                ", ".join(
                    f"{w.split(',')[0].split(' (')[0]}{' d0' if p == 0.0 else ''} "
                    + "/".join(f"{times[(w, v)][-1]:.3f}" for v in variants if times[(w, v)])
                    + "s"
                    for w, _, p, _ in cases
                ),
            )
    return times, warm


def tokens_of(models):
    return models["tokens"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: RBT3-chinese, batch 8, 3 rounds")
    ap.add_argument(
        "--text-model", default=None, help="default RoBERTa-wwm-ext-base-chinese (RBT3-chinese with --quick)"
    )
    ap.add_argument("--batch", type=int, default=None, help="texts per batch (default 64, 8 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, 3 with --quick)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--torchcompile",
        action="store_true",
        help="also time our SDPA tower compiled (inductor) on the train step and extraction",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    text_model = args.text_model or ("RBT3-chinese" if args.quick else "RoBERTa-wwm-ext-base-chinese")
    batch = args.batch or (8 if args.quick else 64)
    rounds = args.rounds or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    config = ModelConfig("ViT-Tiny", text_model, context_length=52)
    model = build_model(config, device=args.device)
    texts = make_texts(batch, args.seed)
    tokens = tokenize(texts, context_length=config.context_length).to(args.device)
    lengths = tokens.ne(PAD_ID).sum(1)
    log.info(
        "%s, %d texts of %d-%d chars -> tokens %s (real tokens %d-%d), %d torch threads",
        text_model,
        batch,
        min(map(len, texts)),
        max(map(len, texts)),
        tuple(tokens.shape),
        int(lengths.min()),
        int(lengths.max()),
        torch.get_num_threads(),
    )
    models = {"eager": model, "tokens": tokens}
    variants = VARIANTS if args.torchcompile else VARIANTS[:2]
    if args.torchcompile:
        models["compiled"] = _compiled_copy(model, args.device)

    attn_p = model.bert_config.attention_probs_dropout_prob
    cases = [
        (f"train step (fwd+bwd), dropout {attn_p:g}", train_step, None, True),
        ("train step (fwd+bwd), dropout 0", train_step, 0.0, False),
        ("feature extraction (no_grad fwd)", extract, None, True),
        ("self-attention modules only, fwd+bwd x layers, dropout 0", attention_only, None, False),
    ]
    times, warm = _time_rounds(models, cases, variants, rounds)
    model.zero_grad(set_to_none=True)
    feat_diff, hidden_diff = output_difference(model, tokens)
    print(
        f"\n{text_model} text tower, random weights, {args.device} fp32, batch {batch} x {tokens.shape[1]} tokens, "
        f"{torch.get_num_threads()} threads, {rounds} interleaved rounds: median time, and the median over rounds "
        "of the round's ratio upstream/variant with its spread (interquartile range / median)\n"
    )
    print(
        "| case | "
        + " | ".join(f"{v} s" for v in variants)
        + " | "
        + " | ".join(f"upstream/{v}" for v in variants[1:])
        + " |"
    )
    print("|---|" + "---:|" * (2 * len(variants) - 1))
    noisy = []
    for what, _, _, _ in cases:
        cols, ratios = [], []
        for v in variants:
            t = times[(what, v)]
            cols.append(f"{statistics.median(t):.3f}" if t else "-")
            if v != "upstream":
                med, spread = summary([u / x for u, x in zip(times[(what, "upstream")], t)]) if t else (0, 0)
                ratios.append(f"{med:.2f}x ±{100 * spread:.0f}%" if t else "-")
                noisy += [f"{what}, {v}"] if spread > SPREAD_WARNING else []
        print(f"| {what} | " + " | ".join(cols) + " | " + " | ".join(ratios) + " |")
    if noisy:
        print(f"\nWARNING: spread over 20% ({'; '.join(noisy)}): the load changed during the run, rerun it")
    print(
        f"\nmax |diff| eval features {feat_diff:.2e}, last hidden state (real tokens) {hidden_diff:.2e} (SDPA vs upstream)"
    )
    if args.torchcompile:
        comp = models["compiled"]
        comp.eval()
        with torch.no_grad():
            diff = (comp.encode_text(tokens) - model.eval().encode_text(tokens)).abs().max().item()
        print(f"max |diff| eval features, SDPA+compile vs upstream: {diff:.2e}")
        print(
            "first call (compile included, not in the table): "
            + ", ".join(f"{w.split(' (')[0]} {warm[(w, 'SDPA+compile')]:.1f} s" for w, _, _, c in cases if c)
        )


if __name__ == "__main__":
    main()

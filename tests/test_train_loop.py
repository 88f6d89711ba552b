"""The training step against upstream cn_clip: loss, same-text targets, accumulation; validation extras."""

import json
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from oracles import dyadic
from torch import nn
from train_helpers import make_data, make_split, metrics, tiny_argv

from cn_clip_patch.device import on_device
from solution.model import read_checkpoint
from solution.training.setup import make_optimizer, make_scheduler
from solution.training.step import EMA, Stepper, batch_accuracy, clip_loss, twin_mask
from solution.training.trainer import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("colours"), per_colour_train=2, per_colour_valid=1, colours=4)


def _batch(n, seed=0, res=64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, res, res, generator=g)
    tokens = torch.randint(200, 5000, (n, 7), generator=g)
    tokens[:, 0], tokens[:, -1] = 101, 102
    return images, tokens


def test_twin_texts_are_not_negatives():
    assert twin_mask(torch.tensor([3, 1, 2]), True) is None and twin_mask(torch.tensor([3, 3, 2]), False) is None
    m = twin_mask(torch.tensor([3, 1, 3, 3]), True)  # no twins, or the option off: plain CLIP loss
    assert m.int().tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0]]
    torch.manual_seed(0)
    f = nn.functional.normalize(torch.randn(4, 8), dim=-1)
    img = nn.functional.normalize(f + 0.3 * torch.randn(4, 8), dim=-1).requires_grad_()
    txt = torch.stack([f[0], f[1], f[0], f[3]])  # texts 0 and 2 are the same query
    scale, twins = torch.tensor(20.0), twin_mask(torch.tensor([7, 8, 7, 9]), True)
    plain, ours = clip_loss(img, txt, scale, None)[0], clip_loss(img, txt, scale, twins)[0]
    assert ours < plain
    # image 0 is no longer pushed away from text 2 (its twin): no gradient through that logit
    assert not torch.allclose(torch.autograd.grad(plain, img)[0][0], torch.autograd.grad(ours, img)[0][0])
    logits = scale * img.detach() @ txt.t()
    assert batch_accuracy(logits, twins)[0] >= batch_accuracy(logits, None)[0]


def test_loss_equals_upstream_get_loss(tiny_model):
    """No duplicates: our loss is cn_clip's ``get_loss`` on the same model and batch."""
    from cn_clip.training.train import get_loss

    images, tokens = _batch(6)
    args = SimpleNamespace(accum_freq=1, distillation=False, aggregate=False, mask_ratio=0.0, local_device_rank=0)
    args.report_training_batch_acc = False
    with on_device("cpu"):
        ref, _ = get_loss(tiny_model, images, tokens, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(), args)
    img, txt, scale = tiny_model(images, tokens)
    ours, _ = clip_loss(img, txt, scale, twin_mask(torch.arange(6), True))
    torch.testing.assert_close(ours, ref)


def _grads(model, micro_batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = SimpleNamespace(precision="fp32", mask_ratio=0.0, same_text_positives=True, skip_aggregate=False)
    Stepper(model, opt, torch.device("cpu"), cfg)(micro_batches)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accum_freq_gives_the_full_batch_gradient(tiny_model):
    images, tokens = _batch(8, seed=3)
    ids = torch.arange(8)
    whole = _grads(tiny_model, [(images, tokens, ids, ids)])
    halves = [(images[:4], tokens[:4], ids[:4], ids[:4]), (images[4:], tokens[4:], ids[4:], ids[4:])]
    accum = _grads(tiny_model, halves)
    for n, g in whole.items():
        expected = g * 2 if n == "logit_scale" else g  # cn_clip: logit_scale gets one gradient per micro-batch
        torch.testing.assert_close(accum[n], expected, atol=1e-6, rtol=1e-4, msg=n)


def test_extra_validation_sets_early_stop_and_plot(tmp_path, data):
    general = make_split(tmp_path / "general", per_colour=1, colours=4, seed=5, first_image_id=9000, text_id_base=500)
    calls = []
    flags = dict(max_steps=8, valid_step_interval=1, early_stop_patience=1, lr="0", skip_scheduler=True)
    argv = tiny_argv(*data, tmp_path, extra_val_data=[f"general={general}"], **flags)
    argv.remove("--no-plot")
    out = main(argv, on_validation=calls.append)
    valid_rows = metrics(tmp_path / "run", "valid")
    # lr 0: no improvement after the first validation -> stop after 1 + 1 validations
    assert [r["step"] for r in valid_rows if r["set"] == "valid"] == [1, 2]
    assert [r["step"] for r in valid_rows if r["set"] == "general"] == [1, 2]
    assert [c["step"] for c in calls] == [1, 2] and all(c["set"] == "valid" for c in calls)
    assert out["best"]["step"] == 1 and out["best_checkpoint"].endswith("best.pt")
    png = tmp_path / "run" / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "run" / "params.json").read_text())["extra_val_data"] == [f"general={general}"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = main(argv)  # the same command re-run: an early-stopped run does not train on
    assert read_checkpoint(again["last_checkpoint"])["step"] == 2
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == lines


def test_grad_checkpointing_is_held_for_the_run_only(tmp_path, data):
    """--grad-checkpointing patches upstream's ``checkpoint`` names for the run only, restored on return or raise."""
    import cn_clip.clip.model as upstream_model
    import cn_clip.clip.modeling_bert as upstream_bert
    from torch.utils.checkpoint import checkpoint

    def names():
        return upstream_model.checkpoint, upstream_bert.checkpoint

    flags = dict(max_steps=1, valid_step_interval=1, valid_epoch_interval=0, lora_rank=2, grad_checkpointing=True)
    seen = []
    main(tiny_argv(*data, tmp_path, name="gc", **flags), on_validation=lambda r: seen.append(names()))
    assert len(seen) == 1 and all(a is not checkpoint and b is not checkpoint for a, b in seen)
    assert names() == (checkpoint, checkpoint)

    def crash(record):
        raise KeyboardInterrupt("a pruned trial")

    with pytest.raises(KeyboardInterrupt):  # the callback's exception propagates, and the patch is undone
        main(tiny_argv(*data, tmp_path, name="crash", **flags), on_validation=crash)
    assert names() == (checkpoint, checkpoint)


def test_grad_scaler_only_for_fp16_autocast_on_cuda(monkeypatch):
    """amp/fp16 on CUDA: float16 autocast with a GradScaler; bf16: no scaler; the CPU: fp32 for amp/fp16."""
    from solution.model.precision import autocast_dtype, grad_scaler

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for p in ("amp", "fp16"):
        assert grad_scaler(cuda, p).is_enabled() and not grad_scaler(cpu, p).is_enabled()
        assert autocast_dtype(cuda, p) == torch.float16 and autocast_dtype(cpu, p) is None
    assert not any(grad_scaler(d, p).is_enabled() for d in (cuda, cpu) for p in ("bf16", "amp_bf16", "fp32"))


def test_ema_follows_its_float64_recursion_exactly_and_swaps_back_bit_for_bit():
    """``ema = D * ema + (1 - D) * w`` after each step, from the first weights: on dyadic weights and D every value
    is exact in float32, so the EMA equals its float64 recursion; swapped in and out, the live weights are intact."""
    rng, model, d = np.random.default_rng(0), nn.Linear(3, 2), 0.75

    def draw():
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.from_numpy(dyadic(rng, p.shape)))
        return [p.detach().double().numpy() for p in model.parameters()]

    want, ema = draw(), EMA(model, d)
    for _ in range(6):
        want = [d * e + (1 - d) * w for e, w in zip(want, draw())]
        ema.update()
    live = [p.detach().clone() for p in model.parameters()]
    assert all(np.array_equal(e.double().numpy(), w) for e, w in zip(ema.shadow, want))
    with ema.swapped():
        assert all(np.array_equal(p.detach().double().numpy(), w) for p, w in zip(model.parameters(), want))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), live))
    assert EMA(model, 0.0).shadow == []  # off: nothing kept, nothing swapped


def test_layer_decay_gives_each_parameter_the_rate_of_its_depth(tiny_model):
    """Each group's rate is the scheduled rate x R^(3 - depth) in both 2-block towers (embeddings 0, block i i+1,
    final norm, projections and logit_scale 3); weight decay on 2-D weights only."""
    cfg = SimpleNamespace(lr=0.5, beta1=0.9, beta2=0.98, eps=1e-6, wd=0.25, warmup=2, max_steps=9, skip_scheduler=False)
    opt = make_optimizer(tiny_model, SimpleNamespace(**vars(cfg), layer_decay=0.75))
    rate = make_scheduler(opt, cfg)(4)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in tiny_model.named_parameters():
        block = re.match(r"(visual\.transformer\.resblocks|bert\.encoder\.layer)\.(\d+)\.", name)
        top = name.startswith(("visual.ln_post", "visual.proj")) or not name.startswith(("visual.", "bert."))
        depth = int(block[2]) + 1 if block else 3 if top else 0
        assert group[id(p)]["lr"] == rate * 0.75 ** (3 - depth), name
        assert group[id(p)]["weight_decay"] == (0.25 if p.ndim >= 2 else 0.0), name


def test_one_loader_per_run_workers_change_nothing_and_a_log_file_gets_a_line_per_step(
    tmp_path, caplog, capsys, monkeypatch, data
):
    """One DataLoader per run: a worker changes no weight; a log file gets a line per train line, a terminal the bar."""
    from torch.utils.data import DataLoader

    from solution.training import loaders

    built, out = [], {}

    class Counting(DataLoader):
        def __init__(self, *a, **k):
            built.append(k["persistent_workers"])
            super().__init__(*a, **k)

    monkeypatch.setattr(loaders, "DataLoader", Counting)
    for workers, tty in ((0, False), (1, True)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        caplog.clear()
        flags = dict(max_epochs=2, augment="gentle", save_epoch_frequency=0, num_workers=workers)
        argv = [a for a in tiny_argv(data[0], None, tmp_path, f"w{workers}", **flags) if a != "--no-progress"]
        out[workers] = read_checkpoint(main(argv)["last_checkpoint"])
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
        assert [x.split(":")[0] for x in lines] == ([] if tty else ["step 1/2", "step 2/2"])
        assert all(all(w in x for w in ("loss ", "lr ", "logit scale ", "pairs/s")) for x in lines)
        assert ("2/2 [" in capsys.readouterr().err) == tty  # the bar's last state
    assert built == [False, True] and out[0]["epoch"] == out[1]["epoch"] == 2
    for k, v in out[0]["state_dict"].items():
        assert torch.equal(out[1]["state_dict"][k], v), k

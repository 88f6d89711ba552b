"""cn_clip_patch.attention: SDPA text tower == upstream's BERT attention; the ViT already reaches SDPA.

Oracles are upstream's own forward on the same model object (the patch switched off), compared in
float32 to ~1e-5, and torch's profiler for which attention op actually runs. The patch's own tests
start from upstream's attention (``attn_impl="upstream"``: models are built on SDPA by default);
the tests at the end check that default and the ``--attn-impl`` switch of the tools.
"""

import copy
import os
import shutil
import sys

import pytest
import torch
from cn_clip.clip.modeling_bert import BertSelfAttention
from torch.profiler import ProfilerActivity, profile

from cn_clip_patch.attention import SdpaBertSelfAttention, sdpa_attention, sdpa_enabled, use_sdpa, vision_reaches_sdpa
from cn_clip_patch.tuning import inject_lora
from solution.model import ModelConfig, build_model

TOL = dict(atol=1e-5, rtol=1e-5)
SDPA_OP = "aten::scaled_dot_product_attention"
UP = "upstream"


@pytest.fixture
def tiny_model(tiny_config):
    """conftest's tiny model, on upstream's attention: the patch's referee starts from upstream."""
    torch.manual_seed(0)
    return build_model(tiny_config, attn_impl=UP)


def _tokens(lengths=(5, 12, 3, 9), width=None, seed=1):
    """Texts of different lengths: [CLS] ids [SEP] then [PAD]=0, as cn_clip's tokenizer lays them out."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    tokens = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(200, 5000, (n,), generator=g)
        tokens[i, 0], tokens[i, n - 1] = 101, 102
    return tokens


def _images(n=2, res=64, seed=2):
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def _set_dropout(model, attention=None, hidden=None):
    for name, mod in model.bert.named_modules():
        if isinstance(mod, torch.nn.Dropout):
            p = attention if name.endswith("self.dropout") else hidden
            if p is not None:
                mod.p = p


def _text_run(model, tokens, grads=True):
    """Text features, the full last hidden state, and grads w.r.t. the embedding output and parameters."""
    store = {}

    def keep(_mod, _inp, out):
        if grads:
            if not out.requires_grad:  # frozen embeddings (LoRA): still take the grad w.r.t. them
                out.requires_grad_()
            out.retain_grad()
        store["emb"] = out

    handle = model.bert.embeddings.register_forward_hook(keep)
    try:
        with torch.set_grad_enabled(grads):
            feats = model.encode_text(tokens)
            mask = tokens.ne(0).float()
            hidden = model.bert(tokens, attention_mask=mask)[0]
            if not grads:
                return feats, hidden, None, None
            model.zero_grad(set_to_none=True)
            (feats.square().sum() + (hidden * mask[..., None]).sin().sum()).backward()
    finally:
        handle.remove()
    params = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return feats.detach(), hidden.detach(), store["emb"].grad.clone(), params


def _assert_same_run(a, b, tol=TOL):
    torch.testing.assert_close(b[0], a[0], **tol)
    torch.testing.assert_close(b[1], a[1], **tol)
    if a[2] is not None:
        torch.testing.assert_close(b[2], a[2], **tol)
        assert a[3].keys() == b[3].keys() and a[3]
        for k in a[3]:  # atol scaled by the tensor's largest grad (sums over every token reach ~1e3)
            atol = tol["atol"] * max(1.0, a[3][k].abs().max().item())
            torch.testing.assert_close(
                b[3][k], a[3][k], atol=atol, rtol=tol["rtol"], msg=lambda m, k=k: f"grad of {k}: {m}"
            )


def _ops(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout0"])
def test_sdpa_text_tower_equals_upstream_with_padding(tiny_model, train):
    model = tiny_model.train(train)
    _set_dropout(model, attention=0.0, hidden=0.0)
    tokens = _tokens()
    assert tokens.eq(0).any()  # padding present: the mask matters
    ref = _text_run(model, tokens)
    ref_ops = _ops(lambda: model.encode_text(tokens))
    assert use_sdpa(model) == model.bert_config.num_hidden_layers
    assert sdpa_enabled(model)
    _assert_same_run(ref, _text_run(model, tokens))
    ops = _ops(lambda: model.encode_text(tokens))
    assert SDPA_OP in ops and SDPA_OP not in ref_ops
    assert "aten::softmax" in ref_ops and "aten::softmax" not in ops  # the fused kernel, not a math fallback


def test_padding_mask_is_honoured(tiny_model):
    """Changing the padded tokens changes nothing for the unpadded positions (as upstream)."""
    model = tiny_model.eval()
    use_sdpa(model)
    tokens = _tokens((4, 10))
    other = tokens.clone()
    other[0, 4:] = torch.arange(300, 306)  # garbage under the mask of text 0
    with torch.no_grad():
        a = model.bert(tokens, attention_mask=tokens.ne(0).float())[0]
        b = model.bert(other, attention_mask=tokens.ne(0).float())[0]
    torch.testing.assert_close(b[0, :4], a[0, :4], **TOL)
    torch.testing.assert_close(b[1], a[1], **TOL)


def test_attention_dropout_is_applied_with_upstream_semantics():
    """Train mode, p > 0: outputs are random and differ from eval; samples have upstream's mean and spread."""
    torch.manual_seed(0)
    cfg = ModelConfig("ViT-Tiny", "RBT-Tiny")
    mod = build_model(cfg, attn_impl=UP).bert.encoder.layer[0].attention.self
    mod.dropout.p = 0.3
    x = torch.randn(2, 8, cfg.model_info["text_hidden_size"], generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 1, 1, 8)
    mask[1, ..., 5:] = -10000.0
    with torch.no_grad():
        eval_out = mod.eval()(x, mask)[0]
        mod.train()
        ref = torch.stack([mod(x, mask)[0] for _ in range(1500)])
        use_sdpa(mod)
        assert type(mod) is SdpaBertSelfAttention
        torch.testing.assert_close(mod.eval()(x, mask)[0], eval_out, **TOL)
        mod.train()
        ours = torch.stack([mod(x, mask)[0] for _ in range(1500)])
    assert not torch.allclose(ours[0], ours[1]) and not torch.allclose(ours[0], eval_out)
    # E[dropout(P)] = P, so the mean over masks is the eval output, for both implementations.
    scale = eval_out.abs().mean()
    assert (ours.mean(0) - eval_out).abs().mean() < 0.05 * scale
    assert (ref.mean(0) - eval_out).abs().mean() < 0.05 * scale
    ratio = ours.std(0).mean() / ref.std(0).mean()
    assert 0.9 < ratio < 1.1, ratio  # same dropout on the probabilities, same spread


def test_head_mask_and_output_attentions_match_upstream(tiny_model):
    model = tiny_model.eval()
    tokens = _tokens()
    mask = tokens.ne(0).float()
    heads, layers = model.bert_config.num_attention_heads, model.bert_config.num_hidden_layers
    head_masks = [torch.tensor([1.0, 0.0]), torch.rand(layers, heads, generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        ref = [model.bert(tokens, attention_mask=mask, head_mask=h)[0] for h in head_masks]
        use_sdpa(model)
        ours = [model.bert(tokens, attention_mask=mask, head_mask=h)[0] for h in head_masks]
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, **TOL)
    # Attention probabilities requested: upstream's own path runs and returns them.
    for mod in model.modules():
        if hasattr(mod, "output_attentions"):
            mod.output_attentions = True
    with torch.no_grad():
        out = model.bert(tokens, attention_mask=mask)
        use_sdpa(model, False)
        ref_out = model.bert(tokens, attention_mask=mask)
    assert len(out[2]) == layers and out[2][0].shape == (len(tokens), heads, tokens.shape[1], tokens.shape[1])
    for r, o in zip(ref_out[2], out[2]):
        torch.testing.assert_close(o, r, **TOL)
    torch.testing.assert_close(out[0], ref_out[0], **TOL)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_vision_tower_already_reaches_sdpa_and_is_untouched(tiny_model, train):
    model = tiny_model.train()
    model.visual.transformer.resblocks[0].eval()  # a mixed state, which must come back as it was
    modes = [m.training for m in model.modules()]
    images = _images()
    assert vision_reaches_sdpa(model, images, train=train)  # upstream ViT: MHA with need_weights=False
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())  # the check's backward left no .grad
    model.train(train)
    with torch.set_grad_enabled(train):
        ops = _ops(lambda: model.encode_image(images))
    assert SDPA_OP in ops and "aten::softmax" not in ops  # the fused kernel, not the math fallback
    with torch.no_grad():
        before = model.eval().encode_image(images)
        use_sdpa(model)
        after = model.encode_image(images)
    assert torch.equal(after, before)  # the text switch leaves the image tower's code alone


def test_undo_restores_upstream_exactly_and_nothing_global_changes(tiny_config):
    torch.manual_seed(0)
    model, other = build_model(tiny_config, attn_impl=UP).eval(), build_model(tiny_config, attn_impl=UP).eval()
    upstream_forward = BertSelfAttention.forward
    tokens = _tokens()
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model.encode_text(tokens)
        use_sdpa(model)
        assert all(type(m) is BertSelfAttention for m in other.modules() if isinstance(m, BertSelfAttention))
        assert BertSelfAttention.forward is upstream_forward
        assert list(model.state_dict()) == keys
        assert use_sdpa(model) == 0  # idempotent
        assert use_sdpa(model, enabled=False) == tiny_config.model_info["text_num_hidden_layers"]
        after = model.encode_text(tokens)
    selfs = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    assert selfs and all(type(m) is BertSelfAttention and "forward" not in vars(m) for m in selfs)
    assert not sdpa_enabled(model)
    assert torch.equal(after, ref)  # bitwise: the very same upstream code runs again


def test_context_manager_restores_even_on_error_and_keeps_prior_state(tiny_model):
    model = tiny_model.eval()
    with pytest.raises(RuntimeError), sdpa_attention(model) as m:
        assert m is model and sdpa_enabled(model)
        raise RuntimeError("boom")
    assert not any(isinstance(m, SdpaBertSelfAttention) for m in model.modules())
    use_sdpa(model)
    with sdpa_attention(model):
        pass
    assert sdpa_enabled(model)  # switched before the block: left as it was


@pytest.mark.parametrize("order", ["lora-then-sdpa", "sdpa-then-lora"])
def test_lora_wrapped_towers_still_equal(tiny_config, order):
    torch.manual_seed(0)
    model = build_model(tiny_config, attn_impl=UP)
    if order == "sdpa-then-lora":
        use_sdpa(model)
    inject_lora(model, {"rank": 4, "alpha": 8.0, "dropout": 0.0})
    with torch.no_grad():  # peft starts with B = 0 (a no-op); make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.train()
    _set_dropout(model, attention=0.0, hidden=0.0)
    tokens = _tokens()
    use_sdpa(model, enabled=False)
    ref = _text_run(model, tokens)
    assert any("lora_" in k for k in ref[3])
    use_sdpa(model)
    _assert_same_run(ref, _text_run(model, tokens))
    assert vision_reaches_sdpa(model, _images(), train=True) and vision_reaches_sdpa(model, _images())


def test_real_roberta_base_text_config_equals_upstream():
    torch.manual_seed(0)
    model = build_model(ModelConfig("ViT-Tiny", "RoBERTa-wwm-ext-base-chinese"), attn_impl=UP).eval()
    tokens = _tokens((14, 7), seed=5)
    ref = _text_run(model, tokens)
    with sdpa_attention(model):
        ours = _text_run(model, tokens)
    assert not sdpa_enabled(model)
    _assert_same_run(ref, ours, tol=dict(atol=2e-5, rtol=1e-4))


@pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None,
    reason="torch.compile (inductor) on CPU needs a C compiler",
)
@pytest.mark.skipif(os.environ.get("SKIP_COMPILE_TESTS") == "1", reason="SKIP_COMPILE_TESTS=1")
def test_torch_compile_of_sdpa_text_tower_matches_eager(tiny_model):
    model = tiny_model.eval()
    use_sdpa(model)
    tokens = _tokens()
    torch._dynamo.reset()
    compiled = torch.compile(model.encode_text, fullgraph=True)  # no graph break in our forward
    with torch.no_grad():
        eager = model.encode_text(tokens)
        got = compiled(tokens)
    torch.testing.assert_close(got, eager, **TOL)
    torch._dynamo.reset()


def test_deepcopy_keeps_the_switch(tiny_model):
    use_sdpa(tiny_model)
    clone = copy.deepcopy(tiny_model)
    assert sdpa_enabled(clone)
    use_sdpa(clone, False)
    assert sdpa_enabled(tiny_model) and not sdpa_enabled(clone)


# --- The switch in the toolkit: SDPA by default everywhere a model is built, --attn-impl to compare ---------------


def test_tools_default_to_sdpa_and_refuse_an_unknown_impl(tiny_config, capsys):
    from solution.common import run_cli
    from solution.features import main as features_main
    from solution.model import ATTN_IMPLS, meta_model, set_attn_impl
    from solution.training.flags import parse_args
    from solution.training.trainer import main as train_main

    assert ATTN_IMPLS == ("sdpa", "upstream")
    assert sdpa_enabled(build_model(tiny_config)) and not sdpa_enabled(build_model(tiny_config, attn_impl=UP))
    assert sdpa_enabled(meta_model(tiny_config)) and not sdpa_enabled(meta_model(tiny_config, attn_impl=UP))
    with pytest.raises(Exception, match="unknown attention implementation 'flash'"):
        set_attn_impl(build_model(tiny_config), "flash")
    assert parse_args(["--train-data", "x"]).attn_impl == "sdpa"
    assert parse_args(["--train-data", "x", "--attn-impl", "upstream"]).attn_impl == "upstream"
    for argv in (["--train-data", "x", "--attn-impl", "flash"], ["--resume", "x.pt", "--attn-impl", "flash"]):
        cli = train_main if argv[0] == "--train-data" else features_main
        with pytest.raises(SystemExit) as e:
            sys.exit(run_cli(cli, argv))
        assert e.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error") or ": error:" in line]
        assert len(err) == 1 and "--attn-impl" in err[0] and "invalid choice: 'flash'" in err[0], err


def test_features_with_both_impls_are_equal(tmp_path, tiny_config):
    import numpy as np

    from solution.features import main as features_main
    from solution.model import save_checkpoint

    texts = ["红色连衣裙", "一只白色的猫在沙发上睡觉", "鞋", "蓝色 牛仔裤 男款 修身 直筒"]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(f'{{"text_id": {i}, "text": "{t}"}}\n' for i, t in enumerate(texts)), encoding="utf-8")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(tiny_config).state_dict(), tiny_config, epoch=1, step=1)
    feats = {}
    for impl in ("sdpa", UP):
        out = tmp_path / impl / "txt.npy"
        features_main(
            [
                "--extract-text-feats",
                "--text-data",
                str(data),
                "--resume",
                str(ckpt),
                "--text-feat-output-path",
                str(out),
                "--precision",
                "fp32",
                "--device",
                "cpu",
                "--num-workers",
                "0",
                "--no-progress",
                "--no-cache",
                "--attn-impl",
                impl,
            ]
        )
        feats[impl] = np.load(out)
    assert feats["sdpa"].shape == (len(texts), tiny_config.model_info["embed_dim"])
    np.testing.assert_allclose(feats["sdpa"], feats[UP], atol=1e-5, rtol=0)
    assert not np.array_equal(feats["sdpa"], np.zeros_like(feats["sdpa"]))


def test_training_with_both_impls_ends_at_the_same_weights(tmp_path, monkeypatch):
    from train_helpers import make_data, tiny_argv

    from solution.model import read_checkpoint
    from solution.training import setup
    from solution.training.trainer import main as train_main

    built = []  # the model the trainer builds, per run: its attention must be the one asked for
    real = setup.build_model
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    train, _ = make_data(tmp_path / "data", per_colour_train=2, per_colour_valid=1, colours=4)
    final = {}
    for impl in ("sdpa", UP):
        train_main(tiny_argv(train, None, tmp_path / "logs", name=impl, max_steps=2, seed=3, attn_impl=impl))
        ckpt = read_checkpoint(tmp_path / "logs" / impl / "checkpoints" / "epoch_latest.pt")
        assert ckpt["step"] == 2
        final[impl] = ckpt["state_dict"]
    assert [sdpa_enabled(m) for m in built] == [True, False]
    assert final["sdpa"].keys() == final[UP].keys()
    for k, v in final["sdpa"].items():
        torch.testing.assert_close(v, final[UP][k], atol=1e-5, rtol=1e-4, msg=k)


def test_attn_impl_is_a_harmless_flag_on_resume():
    from solution.training.flags import FLAGS, FREE
    from solution.training.run_config import training_flags

    assert FLAGS["attn_impl"].resume == FREE  # a resume under the other impl is logged, not refused
    base = {"lr": 1e-3, "attn_impl": "sdpa"}
    assert training_flags(base) == training_flags({**base, "attn_impl": "upstream"})

"""cn_clip_patch.attention: the SDPA text tower equals upstream's BERT attention; the ViT already reaches SDPA."""

import copy

import pytest
import torch
from cn_clip.clip.modeling_bert import BertConfig, BertSelfAttention
from oracles import ops, sdpa_enabled, vision_reaches_sdpa
from train_helpers import make_data, tiny_argv

from cn_clip_patch.attention import SdpaBertSelfAttention, use_sdpa
from cn_clip_patch.tuning import inject_lora
from solution.model import build_model

TOL = dict(atol=1e-5, rtol=1e-5)
SDPA = "aten::scaled_dot_product_attention"
IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config, attn_impl="upstream")


def _tokens(lengths=(5, 12, 3, 9), seed=1):
    """Texts of different lengths: [CLS] ids [SEP] then [PAD]=0, as cn_clip's tokenizer lays them out."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(200, 5000, (n,), generator=g)
        tokens[i, 0], tokens[i, n - 1] = 101, 102
    return tokens


def _no_dropout(model):
    for mod in model.bert.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0


def _text_run(model, tokens):
    """Text features, the last hidden state, and grads w.r.t. the embedding output and the parameters."""
    store = {}

    def keep(_mod, _inp, out):
        if not out.requires_grad:  # frozen embeddings (LoRA): still the grad w.r.t. them
            out.requires_grad_()
        out.retain_grad()
        store["emb"] = out

    handle = model.bert.embeddings.register_forward_hook(keep)
    try:
        feats = model.encode_text(tokens)
        mask = tokens.ne(0).float()
        hidden = model.bert(tokens, attention_mask=mask)[0]
        model.zero_grad(set_to_none=True)
        (feats.square().sum() + (hidden * mask[..., None]).sin().sum()).backward()
    finally:
        handle.remove()
    params = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return feats.detach(), hidden.detach(), store["emb"].grad.clone(), params


def _assert_same_run(a, b, tol=TOL):
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(y, x, **tol)
    assert a[3].keys() == b[3].keys() and a[3]
    for k in a[3]:  # atol scaled by the tensor's largest grad (sums over every token reach ~1e3)
        atol = tol["atol"] * max(1.0, a[3][k].abs().max().item())
        torch.testing.assert_close(
            b[3][k], a[3][k], atol=atol, rtol=tol["rtol"], msg=lambda m, k=k: f"grad of {k}: {m}"
        )


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout0"])
def test_sdpa_text_tower_equals_upstream_with_padding(model, train):
    model.train(train)
    _no_dropout(model)
    tokens = _tokens()
    ref, ref_ops = _text_run(model, tokens), ops(lambda: model.encode_text(tokens))
    assert use_sdpa(model) == model.bert_config.num_hidden_layers and sdpa_enabled(model)
    _assert_same_run(ref, _text_run(model, tokens))
    got_ops = ops(lambda: model.encode_text(tokens))
    assert SDPA in got_ops and SDPA not in ref_ops
    assert "aten::softmax" in ref_ops and "aten::softmax" not in got_ops  # the fused kernel, not a math fallback


def test_attention_dropout_is_applied_with_upstream_semantics(model):
    """Train mode, p > 0: outputs are random and differ from eval; samples have upstream's mean and spread."""
    mod = model.bert.encoder.layer[0].attention.self
    mod.dropout.p = 0.3
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 1, 1, 8)
    mask[1, ..., 5:] = -10000.0
    with torch.no_grad():
        eval_out = mod.eval()(x, mask)[0]
        ref = torch.stack([mod.train()(x, mask)[0] for _ in range(1000)])
        use_sdpa(mod)
        assert type(mod) is SdpaBertSelfAttention
        torch.testing.assert_close(mod.eval()(x, mask)[0], eval_out, **TOL)
        ours = torch.stack([mod.train()(x, mask)[0] for _ in range(1000)])
    assert not torch.allclose(ours[0], ours[1]) and not torch.allclose(ours[0], eval_out)
    scale = eval_out.abs().mean()  # E[dropout(P)] = P: the mean over masks is the eval output, for both
    assert (ours.mean(0) - eval_out).abs().mean() < 0.05 * scale
    assert (ref.mean(0) - eval_out).abs().mean() < 0.05 * scale
    assert 0.9 < ours.std(0).mean() / ref.std(0).mean() < 1.1  # the same dropout on the probabilities


def test_head_mask_and_output_attentions_match_upstream(model):
    model.eval()
    tokens = _tokens()
    mask = tokens.ne(0).float()
    heads, layers = model.bert_config.num_attention_heads, model.bert_config.num_hidden_layers
    head_masks = [torch.tensor([1.0, 0.0]), torch.rand(layers, heads, generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        ref = [model.bert(tokens, attention_mask=mask, head_mask=h)[0] for h in head_masks]
        use_sdpa(model)
        for r, h in zip(ref, head_masks):
            torch.testing.assert_close(model.bert(tokens, attention_mask=mask, head_mask=h)[0], r, **TOL)
        for mod in model.modules():  # attention probabilities requested: upstream's own path returns them
            if hasattr(mod, "output_attentions"):
                mod.output_attentions = True
        out = model.bert(tokens, attention_mask=mask)
        use_sdpa(model, False)
        ref_out = model.bert(tokens, attention_mask=mask)
    assert len(out[2]) == layers and out[2][0].shape == (len(tokens), heads, tokens.shape[1], tokens.shape[1])
    for r, o in zip((ref_out[0], *ref_out[2]), (out[0], *out[2])):
        torch.testing.assert_close(o, r, **TOL)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_vision_tower_already_reaches_sdpa_and_is_untouched(model, train):
    model.train()
    model.visual.transformer.resblocks[0].eval()  # a mixed state, which must come back as it was
    modes = [m.training for m in model.modules()]
    assert vision_reaches_sdpa(model, IMAGES, train=train)  # upstream ViT: MHA with need_weights=False
    assert [m.training for m in model.modules()] == modes and all(p.grad is None for p in model.parameters())
    assert "aten::softmax" not in ops(lambda: model.train(train).encode_image(IMAGES))  # fused, not the math path
    with torch.no_grad():
        before = model.eval().encode_image(IMAGES)
        use_sdpa(model)
        assert torch.equal(model.encode_image(IMAGES), before)  # the text switch leaves the image tower alone


def test_undo_restores_upstream_exactly_and_nothing_global_changes(tiny_config):
    torch.manual_seed(0)
    model, other = (build_model(tiny_config, attn_impl="upstream").eval() for _ in range(2))
    forward, tokens, keys = BertSelfAttention.forward, _tokens(), list(model.state_dict())
    with torch.no_grad():
        ref = model.encode_text(tokens)
        use_sdpa(model)
        assert all(type(m) is BertSelfAttention for m in other.modules() if isinstance(m, BertSelfAttention))
        assert BertSelfAttention.forward is forward and list(model.state_dict()) == keys
        assert use_sdpa(model) == 0  # idempotent
        assert use_sdpa(model, enabled=False) == tiny_config.model_info["text_num_hidden_layers"]
        after = model.encode_text(tokens)
    selfs = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    assert selfs and all(type(m) is BertSelfAttention and "forward" not in vars(m) for m in selfs)
    assert torch.equal(after, ref)  # bitwise: the very same upstream code runs again
    use_sdpa(model)
    clone = copy.deepcopy(model)
    assert sdpa_enabled(clone) and use_sdpa(clone, False) and sdpa_enabled(model)  # a deep copy has its own switch


@pytest.mark.parametrize("order", ["lora-then-sdpa", "sdpa-then-lora"])
def test_lora_wrapped_towers_still_equal(model, order):
    if order == "sdpa-then-lora":
        use_sdpa(model)
    inject_lora(model, {"rank": 4, "alpha": 8.0, "dropout": 0.0})
    with torch.no_grad():  # peft starts with B = 0 (a no-op); make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    _no_dropout(model.train())
    use_sdpa(model, enabled=False)
    ref = _text_run(model, _tokens())
    assert any("lora_" in k for k in ref[3])
    use_sdpa(model)
    _assert_same_run(ref, _text_run(model, _tokens()))
    assert vision_reaches_sdpa(model, IMAGES, train=True) and vision_reaches_sdpa(model, IMAGES)


def test_real_sized_attention_equals_upstream_and_compiles_without_a_graph_break():
    """RBT3's sizes (768 wide, 12 heads of 64): outputs and gradients equal upstream's; SDPA compiles as one graph."""
    torch.manual_seed(0)
    mod = BertSelfAttention(BertConfig(hidden_size=768, num_attention_heads=12, attention_probs_dropout_prob=0.0))
    x, mask = torch.randn(2, 14, 768, requires_grad=True), torch.zeros(2, 1, 1, 14)
    mask[1, ..., 7:] = -10000.0  # the second text is padded after 7 tokens
    runs = []
    for _ in range(2):  # upstream's, then SDPA
        out = mod(x, mask)[0]
        runs.append([out, *torch.autograd.grad(out.sin().sum(), [x, *mod.parameters()])])
        use_sdpa(mod)
    for got, ref in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, ref, atol=2e-5 * max(1.0, ref.abs().max().item()), rtol=1e-4)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, mask)[0], runs[1][0], **TOL)
    torch._dynamo.reset()


def test_training_and_features_run_on_the_attention_asked_for(tmp_path, monkeypatch, capsys):
    """``--attn-impl upstream`` reaches the model each CLI runs (the default, SDPA: ``test_models``)."""
    from solution.features import main as features
    from solution.retrieval import extract
    from solution.training import setup
    from solution.training.flags import FLAGS, FREE, parse_args
    from solution.training.trainer import main as train_main

    assert parse_args(["--train-data", "x"]).attn_impl == "sdpa" and FLAGS["attn_impl"].resume == FREE  # either
    used, build, encode = [], setup.build_model, extract.encode_texts
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: used.append(build(*a, **k)) or used[-1])
    monkeypatch.setattr(extract, "encode_texts", lambda m, *a, **k: used.append(m) or encode(m, *a, **k))
    train, _ = make_data(tmp_path / "data", per_colour_train=2, colours=4)
    out = train_main(tiny_argv(train, None, tmp_path / "logs", max_steps=1, attn_impl="upstream"))
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text_id": 1, "text": "红色连衣裙"}\n', encoding="utf-8")
    argv = ["--extract-text-feats", "--text-data", str(texts), "--resume", out["last_checkpoint"], "--no-progress"]
    features([*argv, "--text-feat-output-path", str(tmp_path / "t.npy"), "--attn-impl", "upstream"])
    assert len(used) == 2 and not any(sdpa_enabled(m) for m in used)
    with pytest.raises(SystemExit) as e:
        features([*argv, "--attn-impl", "flash"])
    assert e.value.code == 2 and "invalid choice: 'flash'" in capsys.readouterr().err

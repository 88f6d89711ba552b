"""``--torchcompile`` in training and extraction: compiled equals eager, compile time is kept out of step times,
what cannot compile is one line. Graphs use the ``aot_eager`` backend (no C++ build)."""

import json

import numpy as np
import pytest
import torch
from train_helpers import make_data, metrics, tiny_argv

from cn_clip_patch.tuning import apply_tuning, tuning_recipe
from solution.common import SolutionError
from solution.features import main as features_main
from solution.model import build_model, compiled, save_checkpoint
from solution.model.compiled import check_compile, compile_towers
from solution.training.trainer import main as train_main


@pytest.fixture
def aot_trainer(monkeypatch):
    """The trainer's --torchcompile with the aot_eager backend."""
    from solution.training import trainer

    monkeypatch.setattr(trainer, "compile_towers", lambda model, device: compile_towers(model, device, "aot_eager"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_compiled_training_equals_eager_and_logs_compile_time_apart(tmp_path, caplog, aot_trainer):
    """Same losses and weights after 3 steps; the train line's batch_time leaves out the compile seconds it logs."""
    train, _ = make_data(tmp_path / "data")
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--torchcompile"])):
        argv = tiny_argv(train, None, tmp_path / "logs", name, max_steps=3, valid_epoch_interval=0) + extra
        train_main(argv)
        runs[name] = tmp_path / "logs" / name
    eager, comp = (metrics(runs[n]) for n in ("eager", "compiled"))
    assert [r["step"] for r in comp] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in comp], [r["loss"] for r in eager], rtol=1e-5, atol=1e-6)
    w_e, w_c = (_weights(runs[n] / "checkpoints" / "epoch_latest.pt") for n in ("eager", "compiled"))
    assert w_e.keys() == w_c.keys()  # compiled in place: no _orig_mod. in the checkpoint
    for k in w_e:
        torch.testing.assert_close(w_c[k], w_e[k], rtol=1e-4, atol=1e-5, msg=k)
    assert "compile_s" not in eager[0]
    first = comp[0]
    assert first["compile_s"] > 0 and first["batch_time"] < first["compile_s"]
    assert first["pairs_per_s"] == pytest.approx(8 / first["batch_time"])
    assert any(r.getMessage().startswith("torch.compile: ") and "left out of the step" in r.msg for r in caplog.records)
    assert json.loads((runs["compiled"] / "params.json").read_text())["torchcompile"] is True


# --- refusals: one line, before anything runs or is written ----------------------------------------------------


def test_lora_on_the_vit_attention_is_refused_and_text_lora_compiles_and_matches_eager(tiny_model, tiny_config):
    """peft's LoRA on nn.MultiheadAttention fails in AOTAutograd: refused; text LoRA compiles and matches eager."""
    model = apply_tuning(tiny_model, tuning_recipe(lora_rank=4))
    with pytest.raises(SolutionError, match=r"--torchcompile cannot compile LoRA on nn.MultiheadAttention \(visual\."):
        compile_towers(model, "cpu", "aot_eager")
    assert all(m._compiled_call_impl is None for m in model.modules())
    torch.manual_seed(0)
    model = apply_tuning(build_model(tiny_config), tuning_recipe(lora_rank=4, lora_targets=r".*\.(query|key|value)$"))
    with torch.no_grad():  # non-zero B, so the adapters change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    tokens = torch.tensor([[101, 800, 900, 1000, 102, 0], [101, 700, 102, 0, 0, 0]])
    with torch.no_grad():
        eager = model.encode_text(tokens)
        compile_towers(model, "cpu", "aot_eager")
        blocks = compiled.blocks(model.bert) + compiled.blocks(model.visual)  # regional: each repeated block
        assert all(b._compiled_call_impl is not None for b in blocks)
        assert len(compiled.blocks(model.bert)) == model.bert_config.num_hidden_layers
        got = model.encode_text(tokens)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-6)


def test_trainer_refuses_vit_lora_with_compile_in_one_line(tmp_path, aot_trainer):
    train, _ = make_data(tmp_path / "data", per_colour_train=2)
    argv = tiny_argv(train, None, tmp_path / "logs", "lora", max_steps=1, lora_rank=4, torchcompile=True)
    with pytest.raises(SolutionError, match="--torchcompile cannot compile LoRA on nn.MultiheadAttention") as e:
        train_main(argv)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "logs" / "lora" / "metrics.jsonl").exists()


def test_missing_toolchains_and_unsupported_python_are_refused(monkeypatch, tmp_path, tiny_config):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(SolutionError, match="--torchcompile on the CPU needs a C\\+\\+ compiler for inductor"):
        check_compile("cpu")
    check_compile("cpu", "aot_eager")  # no code generation: no compiler needed
    (tmp_path / "texts.jsonl").write_text('{"text_id": 1, "text": "红色连衣裙"}\n', encoding="utf-8")
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(tiny_config).state_dict(), tiny_config)
    argv = f"--resume {ckpt} --extract-text-feats --text-data {tmp_path / 'texts.jsonl'} --device cpu --torchcompile"
    with pytest.raises(SolutionError, match="needs a C\\+\\+ compiler"):  # before reading a model or writing
        features_main([*argv.split(), "--text-feat-output-path", str(tmp_path / "x_txt.npy")])
    assert not list(tmp_path.glob("x_*"))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    with pytest.raises(SolutionError, match="--torchcompile on CUDA needs triton"):
        check_compile(torch.device("cuda"))
    monkeypatch.setattr(torch._dynamo.eval_frame, "is_dynamo_supported", lambda: False)
    with pytest.raises(SolutionError, match="torch.compile does not support this Python"):
        check_compile("cpu", "aot_eager")


def test_compile_clock_counts_only_new_compile_seconds(monkeypatch):
    seconds = iter([10.0, 12.5, 12.5, 11.0])  # dynamo's total (a reset may lower it: never negative)
    monkeypatch.setattr(compiled, "compile_seconds", lambda: next(seconds))
    clock = compiled.CompileClock()
    assert [clock.lap(), clock.lap(), clock.lap()] == [2.5, 0.0, 0.0]

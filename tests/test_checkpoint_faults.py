"""Hostile checkpoints and full disks: one ``error:`` line, exit 2, nothing written; checkpoints read mapped."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest
import torch
from train_helpers import error_line, make_data, tiny_argv

from solution import features, soup, train
from solution.common import SolutionError, run_cli
from solution.model import ModelConfig, build_model, load_model, read_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A good tiny checkpoint, a second one, the state dict and config they hold, texts and training data."""
    root = tmp_path_factory.mktemp("faults")
    cfg = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=16)
    torch.manual_seed(0)
    sd = build_model(cfg).state_dict()
    save_checkpoint(root / "good.pt", sd, cfg)
    save_checkpoint(root / "other.pt", {k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}, cfg)
    (root / "texts.jsonl").write_text('{"text_id": 1, "text": "红色"}\n', encoding="utf-8")
    train_split, _ = make_data(root / "data", per_colour_train=1, per_colour_valid=1, colours=4)
    return root, cfg, sd, train_split


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _bad_checkpoint(kind: str, path, cfg: ModelConfig, sd: dict) -> str:
    """Write a hostile checkpoint; return what its error line must name."""
    sd = dict(sd)
    if kind in ("nan", "inf"):
        for name in ("visual.proj", "bert.encoder.layer.1.output.dense.weight"):
            sd[name] = sd[name].clone()
            sd[name][0, 0] = float("nan") if kind == "nan" else float("-inf")
        save_checkpoint(path, sd, cfg)
        return "non-finite weights (NaN or Inf) in 2 tensors: visual.proj, bert.encoder.layer.1.output.dense.weight"
    if kind == "unknown_arch":  # weights that fit, a name nothing knows: it would be mislabelled
        config = {**cfg.to_dict(), "vision_model": "ViT-Nope"}
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "config": config}, path)
        return "unknown vision architecture 'ViT-Nope'"
    if kind == "other_shape":  # a wider vision tower under the config of the tiny one
        wide = dataclasses.replace(cfg, model_info={**cfg.model_info, "vision_width": 128})
        save_checkpoint(path, build_model(wide).state_dict(), cfg)
        return "not ViT-Tiny@RBT-Tiny: 32 tensors differ in shape (visual.class_embedding 128 vs 64"
    sd["visual.positional_embedding"] = torch.zeros(51, 64)  # bad_grid: 50 image positions, no square grid
    save_checkpoint(path, sd, cfg)
    return "1 tensor differs in shape (visual.positional_embedding 51x64 vs 65x64)"


@pytest.mark.parametrize("kind", ["nan", "inf", "unknown_arch", "other_shape", "bad_grid"])
@pytest.mark.parametrize("consumer", ["features", "train", "soup"])
def test_bad_checkpoint_is_one_line_in_every_consumer(tiny, tmp_path, capsys, kind, consumer):
    root, cfg, sd, train_split = tiny
    bad = tmp_path / "bad.pt"
    expect = _bad_checkpoint(kind, bad, cfg, sd)
    before = _digest(bad)
    if consumer == "features":
        argv = f"--resume {bad} --extract-text-feats --text-data {root}/texts.jsonl --device cpu --no-progress"
        line = error_line(capsys, [*argv.split(), "--text-feat-output-path", str(tmp_path / "t.npy")], features.main)
    elif consumer == "train":
        argv = tiny_argv(train_split, None, tmp_path / "logs", resume=bad, max_epochs=1, batch_size=2)
        if kind == "unknown_arch":  # the names come from the checkpoint, not from flags
            for flag in ("--vision-model", "--text-model"):
                del argv[argv.index(flag) : argv.index(flag) + 2]
        line = error_line(capsys, argv, train.main)
    else:
        argv = f"--checkpoints {root}/good.pt {bad} --method uniform --no-score --output {tmp_path}/soup"
        line = error_line(capsys, argv.split(), soup.main)
    assert str(bad) in line and expect in line, line
    assert _digest(bad) == before and [p.name for p in tmp_path.rglob("*.pt")] == ["bad.pt"]  # nothing written
    assert not list(tmp_path.glob("t*")) and not (tmp_path / "soup").exists()


def test_load_model_takes_the_stored_sizes_resizes_a_grid_and_refuses_a_config_it_cannot_read(tiny, tmp_path, caplog):
    _, cfg, sd, _ = tiny
    wide = dataclasses.replace(cfg, model_info={**cfg.model_info, "vision_width": 128})
    save_checkpoint(tmp_path / "w.pt", build_model(wide).state_dict(), wide)
    model, config, _ = load_model(tmp_path / "w.pt")
    assert config.model_info["vision_width"] == 128 and model.visual.proj.shape == (128, 64)
    assert "differs from the registry's in vision_width (128, registry 64)" in caplog.text
    save_checkpoint(tmp_path / "g.pt", {**sd, "visual.positional_embedding": torch.zeros(50, 64)}, cfg)
    assert load_model(tmp_path / "g.pt")[0].visual.positional_embedding.shape == (65, 64)  # 7x7, resized as upstream
    sizes = {k: v for k, v in cfg.model_info.items() if k != "vision_width"}
    text = "its config names 'ViT-Tiny' as the text architecture, but it is not a text model config"
    for config, message in (
        ("ViT-Tiny", "its 'config' is a str, not a mapping"),
        ({**cfg.to_dict(), "model_info": sizes}, "its config's model_info lacks vision_width"),
        ({**cfg.to_dict(), "text_model": "ViT-Tiny"}, text),
    ):
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "config": config}, tmp_path / "s.pt")
        with pytest.raises(SolutionError, match=r"s\.pt: " + message):
            load_model(tmp_path / "s.pt")


# ---------------------------------------------------------------- full disk (a real small tmpfs)


def test_soup_on_a_full_disk_keeps_the_previous_soup(tiny, small_disk, capsys):
    root, _, _, _ = tiny
    out = small_disk(10) / "soup"  # the first soup (6 MB + logs) fits; a second soup.pt beside it does not
    run = ["--method", "uniform", "--no-score", "--output", str(out), "--checkpoints"]
    assert run_cli(soup.main, [*run, str(root / "good.pt"), str(root / "other.pt")]) == 0
    kept = {name: _digest(out / name) for name in ("soup.pt", "summary.json")}
    assert f"disk full at {out / 'soup.pt'}" in error_line(capsys, [*run, str(root / "good.pt")], soup.main)
    assert {name: _digest(out / name) for name in kept} == kept and not list(out.glob(".*.tmp"))
    recipe = torch.load(out / "soup.pt", weights_only=True)["recipe"]
    assert json.loads((out / "summary.json").read_text())["soups"]["uniform"]["members"] == recipe["members"]


# ---------------------------------------------------------------- memory: mapped, then let go


def test_read_checkpoint_maps_a_zip_file_and_reads_a_legacy_one_whole(tiny, tmp_path, monkeypatch):
    root, cfg, sd, _ = tiny
    calls, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    ckpt = read_checkpoint(root / "good.pt")
    assert calls[-1]["mmap"] is True and calls[-1]["weights_only"] is True and calls[-1]["map_location"] == "cpu"
    if os.path.exists("/proc/self/maps"):  # file-backed pages, not a copy in the process
        assert str((root / "good.pt").resolve()) in open("/proc/self/maps", encoding="utf-8").read()
    assert torch.equal(ckpt["state_dict"]["module.logit_scale"], sd["logit_scale"])
    before = _digest(root / "good.pt")
    ckpt["state_dict"]["module.logit_scale"].add_(1.0)  # a private mapping: the file never changes
    del ckpt
    assert _digest(root / "good.pt") == before
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, legacy, _use_new_zipfile_serialization=False)
    got = read_checkpoint(legacy)
    assert calls[-1]["mmap"] is False and all(torch.equal(got["state_dict"][f"module.{k}"], v) for k, v in sd.items())


def test_trainer_lets_go_of_the_start_checkpoint_once_restored(tiny, tmp_path, monkeypatch):
    """No reference to the start checkpoint (weights + optimizer state) or its state dict is left at the first step."""
    import gc
    import weakref

    from solution.training import setup, trainer

    root, cfg, sd, train_split = tiny
    trainer.main(tiny_argv(train_split, None, tmp_path / "logs", name="a", max_steps=1, batch_size=2))

    class Box(dict):  # a dict that takes weak references
        pass

    refs, alive, real_read, real_train = [], [], setup.read_checkpoint, trainer.Trainer._train

    def read(path, **kw):
        ckpt = Box(real_read(path, **kw))
        ckpt["state_dict"] = Box(ckpt["state_dict"])
        refs.extend([weakref.ref(ckpt), weakref.ref(ckpt["state_dict"])])
        return ckpt

    def train_loop(self, bar):
        gc.collect()
        alive.append([r() is not None for r in refs])
        return real_train(self, bar)

    monkeypatch.setattr(setup, "read_checkpoint", read)
    monkeypatch.setattr(trainer.Trainer, "_train", train_loop)
    kw = dict(batch_size=2, reset_data_offset=True)
    start = tmp_path / "logs" / "a" / "checkpoints" / "epoch_latest.pt"
    trainer.main(tiny_argv(train_split, None, tmp_path / "logs", name="b", max_steps=2, resume=start, **kw))
    assert alive == [[False, False]]

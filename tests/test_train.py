"""Trainer end to end on tiny coloured-square LMDBs: tuning modes, checkpoints, official starts, per-query hits."""

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import make_data, metrics, tiny_argv

from cn_clip_patch.tuning import apply_tuning
from solution.model import ModelConfig, build_model, load_model, read_checkpoint
from solution.retrieval.encode import evaluate_split
from solution.training.trainer import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("colours"), per_colour_train=4, per_colour_valid=2)


@pytest.fixture(scope="module")
def initial_recall(data):
    torch.manual_seed(123)  # the trainer's default seed, set the same way before building
    config = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=16)
    return evaluate_split(build_model(config), data[1], config)["mean_recall"]


@pytest.fixture(scope="module")
def stage1(data, initial_recall, tmp_path_factory):
    """Full fine-tuning from random weights (stage 1); the other modes continue from it."""
    logs = tmp_path_factory.mktemp("logs")
    return main(tiny_argv(*data, logs, name="full", max_steps=16, lr="3e-3", warmup=1, valid_epoch_interval=2))


def _check_run(out, n_steps):
    run = out["run_dir"]
    losses = [r["loss"] for r in metrics(run, "train")]
    assert len(losses) == n_steps and sum(losses[-4:]) < sum(losses[:4])
    assert {"r1", "r5", "r10", "mean_recall", "val_loss", "val_acc_i2t", "set"} <= set(metrics(run, "valid")[-1])
    assert all(r["logit_scale"] <= 100.0 + 1e-4 for r in metrics(run, "train"))
    ckpts = {p.name for p in (Path(run) / "checkpoints").iterdir()}
    assert {"epoch_latest.pt", "best.pt", "epoch_1.pt"} <= ckpts


def test_full_fine_tuning_improves_recall(stage1, initial_recall):
    _check_run(stage1, 16)
    assert stage1["best"]["mean_recall"] > initial_recall
    model, config, ckpt = load_model(stage1["last_checkpoint"])
    assert all(k.startswith("module.") for k in ckpt["state_dict"]) and config.tuning["mode"] == "full"
    assert set(ckpt) >= {"epoch", "step", "name", "state_dict", "config", "optimizer", "train_state"}
    assert "optimizer" not in read_checkpoint(Path(stage1["run_dir"]) / "checkpoints" / "epoch_1.pt")


MODES = {
    "lora": {"lora_rank": 8, "lr": "1e-2"},
    "freeze_vision": {"freeze_vision": True},
    "freeze_text": {"freeze_text": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_stage2_mode_trains_and_improves_recall(data, stage1, tmp_path, mode):
    """Each tuning mode, continuing from stage 1 (a progressive fine-tune), beats its starting model."""
    train, valid = data
    start_model, start_config, _ = load_model(stage1["last_checkpoint"])
    start_recall = evaluate_split(start_model, valid, start_config)["mean_recall"]
    init_sd = start_model.state_dict()
    flags = dict(max_steps=12, lr="3e-3", warmup=1, valid_epoch_interval=2, resume=stage1["last_checkpoint"])
    flags.update(reset_data_offset=True, reset_optimizer=True, **MODES[mode])
    out = main(tiny_argv(train, valid, tmp_path, name=mode, **flags))
    _check_run(out, 12)
    assert out["best"]["mean_recall"] > start_recall, (mode, out["best"], start_recall)
    model, config, ckpt = load_model(out["last_checkpoint"])
    assert config.tuning["mode"] == ("lora" if mode == "lora" else "full")
    sd = model.state_dict()
    if mode != "lora":  # a frozen tower stays as it was; the other and the temperature train
        assert not torch.equal(sd["logit_scale"], init_sd["logit_scale"])
    if mode == "freeze_vision":
        assert all(torch.equal(sd[k], init_sd[k]) for k in sd if k.startswith("visual."))
        assert not all(torch.equal(sd[k], init_sd[k]) for k in sd if k.startswith("bert."))
    if mode == "freeze_text":
        assert all(torch.equal(sd[k], init_sd[k]) for k in sd if k.startswith(("bert.", "text_projection")))
        assert not all(torch.equal(sd[k], init_sd[k]) for k in sd if k.startswith("visual."))
    if mode == "lora":
        assert config.tuning["merged"] is True and config.tuning["lora"]["rank"] == 8
        assert (tmp_path / mode / "adapters" / "epoch_latest.pt").is_file()
        # the adapted model (rebuilt from the resumable state) == the merged plain checkpoint
        adapted = build_model(config)
        apply_tuning(adapted, {**config.tuning, "merged": False})
        adapted.load_state_dict(ckpt["train_state"]["adapted_state_dict"])
        adapted.eval()
        model.eval()
        g = torch.Generator().manual_seed(0)
        images = torch.randn(4, 3, 64, 64, generator=g)
        tokens = torch.tensor([[101, 5273, 5682, 102]] * 4)
        with torch.no_grad():
            a, b = adapted(images, tokens), model(images, tokens)
        torch.testing.assert_close(a[0], b[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a[1], b[1], atol=2e-5, rtol=1e-4)
        key = "bert.encoder.layer.0.attention.self.query.weight"
        assert not torch.equal(sd[key], init_sd[key])  # the merged adapters changed the plain weights


def test_an_official_checkpoint_gives_its_architecture_and_weights(tmp_path, monkeypatch):
    """An official file (``module.`` keys, fp16, BERT's pooler, no config): the architecture comes from its
    tensors, cn_clip's optimiser defaults from it."""
    import cn_clip.training.params

    from solution.training.flags import parse_args, resolve

    defaults = {"ViT-Tiny-W96": {"lr": 3e-4, "beta2": 0.9}}  # cn_clip has none for our tiny towers: say some
    monkeypatch.setattr(cn_clip.training.params, "get_default_params", lambda name: defaults.get(name, {}))
    from solution.training.setup import build, find_start

    config = ModelConfig("ViT-Tiny-W96", "RBT-Tiny")  # a second tiny ViT: only the shapes tell which
    torch.manual_seed(0)
    sd = {f"module.{k}": v.half() for k, v in build_model(config).state_dict().items()}
    sd["module.bert.pooler.dense.weight"] = torch.zeros(4, 4, dtype=torch.half)  # as official files carry
    path = tmp_path / "clip_cn_vit-tiny-w96.pt"
    torch.save({"epoch": 30, "step": 1000, "name": "official", "state_dict": sd}, path)
    args = parse_args(["--train-data", "x", "--resume", str(path), "--logs", str(tmp_path), "--lora-rank", "2"])
    start = find_start(tmp_path / "none.pt", args.resume, False)
    cfg = resolve(args, start, world=1, train_pairs=640, device="cpu")
    assert (cfg.vision_model, cfg.text_model) == ("ViT-Tiny-W96", "RBT-Tiny")
    assert (cfg.model_config.vision_model, cfg.model_config.text_model) == ("ViT-Tiny-W96", "RBT-Tiny")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(build(cfg, start).state_dict()[key], sd["module." + key].float())
    assert (cfg.lr, cfg.beta2) == (3e-4, 0.9) and args.lr is None and args.vision_model is None  # typed as typed


def test_best_validation_stores_its_per_query_hits(stage1, data):
    """The hits file holds the best row's queries and hits, whose mean recall is that row's exactly."""
    from solution.data.lmdb_io import LMDBSplit
    from solution.formats.hits import read_hits
    from solution.report.folders import read_run
    from solution.retrieval.encode import split_queries
    from solution.retrieval.metrics import mean_recall

    run = Path(stage1["run_dir"])
    valid = [r for r in metrics(run, "valid") if r["set"] == "valid"]
    assert len(valid) >= 2
    running = None
    for r in valid:  # exactly the rows that beat every earlier one name the file; the others are unchanged
        new_best = running is None or r["mean_recall"] > running
        running = r["mean_recall"] if new_best else running
        assert ("hits" in r) == new_best and r.get("hits", "hits/best.hits.npy") == "hits/best.hits.npy"
    best = max(valid, key=lambda r: r["mean_recall"])
    ids, hits = read_hits(run / "hits" / "best.hits.npy")
    assert hits.shape == (len(ids), 3) and sorted(ids.tolist()) == sorted(split_queries(LMDBSplit(data[1])).text_ids)
    assert mean_recall(hits) == best["mean_recall"] == stage1["best"]["mean_recall"]
    assert "hits" not in stage1["best"]  # the best record (best.pt, train state) keeps its keys
    entry = read_run(run, "full")
    assert entry.hits_note == "" and np.array_equal(entry.hits[1], hits) and entry.scores["mean_recall"] == running

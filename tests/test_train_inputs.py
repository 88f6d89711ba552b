"""Trainer command line: config files, the resolved config, and one clear error line for each kind of bad input."""

import json

import pytest
import torch
from train_helpers import make_data, tiny_argv

from solution.common import SolutionError, run_cli
from solution.data.lmdb_io import write_split
from solution.training.flags import build_parser, extra_val_sets, parse_args
from solution.training.run_config import TrainConfig, resolve
from solution.training.setup import Start
from solution.training.trainer import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("colours"), per_colour_train=2, per_colour_valid=1, colours=4)


def test_config_file_keys_are_flag_names_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "train-data: a/train\nbatch_size: 7\nlora-rank: 4\nfreeze-text: true\nlr: 1.0e-4\n"
        "extra-val-data:\n  general: g/valid\n",
        encoding="utf-8",
    )
    args = parse_args(["--config", str(cfg), "--batch-size", "9"])
    assert (args.train_data, args.batch_size, args.lora_rank, args.freeze_text, args.lr) == (
        "a/train",
        9,
        4,
        True,
        1e-4,
    )
    assert extra_val_sets(args.extra_val_data) == {"general": "g/valid"}
    assert (args.max_epochs, args.wd, args.warmup, args.name) == (32, 0.2, 500, "train_clip")
    assert args.context_length is None  # inherited from the starting checkpoint, else 52
    cfg.write_text("train-data: a\nbatch-sise: 3\n", encoding="utf-8")
    with pytest.raises(SolutionError, match="unknown key 'batch-sise'"):
        parse_args(["--config", str(cfg)])


def test_cn_clip_command_line_is_accepted():
    argv = [
        "--train-data",
        "d/train",
        "--val-data",
        "d/valid",
        "--num-workers",
        "2",
        "--valid-num-workers",
        "1",
        "--resume",
        "x.pt",
        "--reset-data-offset",
        "--reset-optimizer",
        "--name",
        "n",
        "--logs",
        "l",
        "--save-step-frequency",
        "100",
        "--save-epoch-frequency",
        "1",
        "--log-interval",
        "5",
        "--report-training-batch-acc",
        "--context-length",
        "52",
        "--warmup",
        "100",
        "--batch-size",
        "128",
        "--valid-batch-size",
        "128",
        "--lr",
        "5e-5",
        "--wd",
        "0.001",
        "--max-epochs",
        "3",
        "--valid-step-interval",
        "150",
        "--valid-epoch-interval",
        "1",
        "--vision-model",
        "ViT-B-16",
        "--text-model",
        "RoBERTa-wwm-ext-base-chinese",
        "--use-augment",
        "--grad-checkpointing",
        "--accum-freq",
        "2",
        "--freeze-vision",
        "--precision",
        "amp",
        "--seed",
        "1",
        "--mask-ratio",
        "0.5",
    ]
    args = parse_args(argv)
    assert args.use_augment and args.accum_freq == 2 and args.mask_ratio == 0.5 and args.freeze_vision
    typed = dict(vars(args))
    cfg = resolve(args, Start(), world=2, train_pairs=1000, device="cpu")
    assert vars(args) == typed  # resolving leaves the typed flags alone
    assert cfg.augment == "cnclip" and args.augment is None
    # 1000 pairs in global micro-batches of 128 x 2 processes: 4 micro-batches, 2 steps (accumulating 2) an epoch
    assert (cfg.steps_per_epoch, cfg.max_steps, cfg.max_epochs, cfg.global_batch_size) == (2, 6, 3, 512)
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.eps) == (5e-5, 0.9, 0.98, 1e-6)  # typed lr, cn_clip's others
    assert cfg.model_config.tuning["freeze_vision"] and cfg.resumed_from is None and cfg.world_size == 2
    with pytest.raises(Exception):
        cfg.lr = 1.0  # frozen


def test_the_resolved_config_has_every_flag_and_params_json_records_both(tmp_path, data):
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    fields = set(TrainConfig.__dataclass_fields__)
    assert dests <= fields, dests - fields
    out = main(tiny_argv(data[0], None, tmp_path, max_steps=3, valid_epoch_interval=0) + ["--lora-rank", "2"])
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert params == json.loads(json.dumps(out["params"]))
    typed = params.pop("typed")
    assert set(typed) == dests and set(params) == fields
    assert (typed["max_epochs"], params["max_epochs"]) == (32, 3)  # 8 pairs at batch 8: one step an epoch
    assert (typed["max_steps"], params["max_steps"], params["steps_per_epoch"]) == (3, 3, 1)
    assert (typed["beta1"], params["beta1"]) == (None, 0.9) and (typed["augment"], params["augment"]) == (None, "none")
    assert (typed["lora_alpha"], params["lora_alpha"]) == (None, 4.0)
    assert (typed["device"], params["device"]) == ("cpu", "cpu")
    assert params["model_config"]["tuning"]["lora"]["alpha"] == 4.0 and params["train_pairs"] == 8


def _error_line(capsys, argv):
    assert run_cli(main, argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_missing_and_malformed_lmdb(tmp_path, capsys, data):
    line = _error_line(capsys, tiny_argv(tmp_path / "nope", None, tmp_path))
    assert "--train-data" in line and "nope" in line
    bad = tmp_path / "bad"
    for sub in ("imgs", "pairs"):
        (bad / sub).mkdir(parents=True)
        (bad / sub / "data.mdb").write_bytes(b"this is not an lmdb file" * 100)
    line = _error_line(capsys, tiny_argv(data[0], bad, tmp_path))
    assert "--val-data" in line and "bad" in line


def test_empty_split(tmp_path, capsys):
    write_split(tmp_path / "empty", [], [])
    assert "empty split" in _error_line(capsys, tiny_argv(tmp_path / "empty", None, tmp_path))


def test_unknown_model_name(tmp_path, capsys, data):
    argv = tiny_argv(data[0], None, tmp_path)
    argv[argv.index("ViT-Tiny")] = "ViT-Nope"
    assert "unknown model name 'ViT-Nope'" in _error_line(capsys, argv)


def test_batch_larger_than_data(tmp_path, capsys, data):
    line = _error_line(capsys, tiny_argv(data[0], None, tmp_path, batch_size=1000))
    assert "larger than the 8 training pairs" in line


def test_prompt_longer_than_context(tmp_path, capsys, data):
    line = _error_line(capsys, tiny_argv(data[0], None, tmp_path, text_prompt="这是一张很长很长很长的商品图片的描述："))
    assert "--text-prompt" in line and "context length of 16" in line


def test_nan_loss_stops_without_overwriting_checkpoints(tmp_path, capsys, data, monkeypatch):
    import solution.training.step as loop

    main(tiny_argv(*data, tmp_path, max_steps=1))
    latest = tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    before = latest.read_bytes()
    real = loop.clip_loss

    def nan_loss(*a, **k):
        loss, logits = real(*a, **k)
        return loss * float("nan"), logits

    monkeypatch.setattr(loop, "clip_loss", nan_loss)
    line = _error_line(capsys, tiny_argv(*data, tmp_path, max_steps=3, allow_changed_flags=True))
    assert "loss is nan" in line
    assert latest.read_bytes() == before
    assert sorted(p.name for p in latest.parent.iterdir()) == ["best.pt", "epoch_1.pt", "epoch_latest.pt"]


def test_resume_of_missing_checkpoint(tmp_path, capsys, data):
    assert "checkpoint not found" in _error_line(capsys, tiny_argv(data[0], None, tmp_path, resume=tmp_path / "x.pt"))


def test_cn_clip_training_checkpoint_is_accepted_with_its_offset(tmp_path, data, tiny_config):
    """A checkpoint as cn_clip's trainer writes it (module. keys + optimizer, no config) is accepted."""
    from solution.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "epoch1.pt"
    torch.save(
        {
            "epoch": 1,
            "step": 4,
            "name": "cnclip",
            "state_dict": sd,
            "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        },
        path,
    )
    out = main(tiny_argv(data[0], None, tmp_path, resume=path, max_steps=6, valid_epoch_interval=0))
    assert out["params"]["resumed_from"] == str(path)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # resumed at step 4 of 6 (data offset kept, as cn_clip does)


def test_prompt_and_context_length_follow_the_starting_checkpoint(tmp_path, data):
    """Fine-tuning from our checkpoint keeps its prompt and context length unless flags change them."""
    from solution.model import ModelConfig, build_model, read_checkpoint, save_checkpoint

    cfg = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=24, text_prompt="图片：")
    start = save_checkpoint(tmp_path / "start.pt", build_model(cfg).state_dict(), cfg)
    argv = tiny_argv(data[0], None, tmp_path, resume=start, max_steps=2, valid_epoch_interval=0)
    i = argv.index("--context-length")
    del argv[i : i + 2]
    out = main(argv)
    stored = read_checkpoint(out["last_checkpoint"])["config"]
    assert (stored["context_length"], stored["text_prompt"]) == (24, "图片：")
    out = main(argv + ["--name", "other", "--text-prompt", "", "--context-length", "20"])
    stored = read_checkpoint(out["last_checkpoint"])["config"]
    assert (stored["context_length"], stored["text_prompt"]) == (20, "")

"""The trainer's command line: flags, config files, and one error line naming the flag for each bad input."""

import dataclasses
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from train_helpers import error_line, make_data, make_split, metrics, tiny_argv

from solution.data.lmdb_io import write_split
from solution.formats.kinds import MARKER
from solution.model import ModelConfig, build_model, read_checkpoint, save_checkpoint
from solution.training import flags
from solution.training.flags import FLAGS, NOT_SETTINGS, FlagError, build_parser, extra_val_sets, parse_args, resolve
from solution.training.setup import Start
from solution.training.trainer import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("colours"), per_colour_train=2, per_colour_valid=1, colours=4)


CN_CLIP = (  # a command line of cn_clip's run_scripts (muge_finetune_vit-b-16_rbt-base.sh)
    "--train-data d/train --val-data d/valid --num-workers 2 --valid-num-workers 1 --resume x.pt --reset-data-offset "
    "--reset-optimizer --name n --logs l --save-step-frequency 100 --save-epoch-frequency 1 --log-interval 5 "
    "--report-training-batch-acc --context-length 52 --warmup 100 --batch-size 128 --valid-batch-size 128 --lr 5e-5 "
    "--wd 0.001 --max-epochs 3 --valid-step-interval 150 --valid-epoch-interval 1 --vision-model ViT-B-16 "
    "--text-model RoBERTa-wwm-ext-base-chinese --use-augment --grad-checkpointing --accum-freq 2 --freeze-vision "
    "--precision amp --seed 1 --mask-ratio 0.5 --kd_loss_weight 0.5 --skip-aggregate"
)


def test_cn_clip_command_line_is_accepted_and_resolved_once():
    args = parse_args(CN_CLIP.split())
    assert args.use_augment and args.accum_freq == 2 and args.mask_ratio == 0.5 and args.freeze_vision
    typed = dict(vars(args))
    cfg = resolve(args, Start(), world=2, train_pairs=1000, device="cpu")
    assert vars(args) == typed  # resolving leaves the typed flags alone
    assert cfg.augment == "cnclip" and args.augment is None
    # 1000 pairs in global micro-batches of 128 x 2 processes: 4 micro-batches, 2 steps (accumulating 2) an epoch
    assert (cfg.steps_per_epoch, cfg.max_steps, cfg.max_epochs, cfg.global_batch_size) == (2, 6, 3, 512)
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.eps) == (5e-5, 0.9, 0.98, 1e-6)  # typed lr, cn_clip's others
    assert cfg.model_config.tuning["freeze_vision"] and cfg.resumed_from is None and cfg.world_size == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    for typed, precision in (("fp16", "amp"), ("amp_bf16", "bf16")):  # one name for one precision (a re-run resumes)
        assert parse_args(["--train-data", "x", "--precision", typed]).precision == precision


def test_config_file_keys_are_flag_names_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    text = "train-data: a/train\nbatch_size: 7\nlora-rank: 4\nfreeze-text: true\nlr: 1.0e-4\nprecision: amp_bf16\n"
    cfg.write_text(text + "same-text-positives: false\nseed: null\nextra-val-data:\n  general: g/valid\n")
    args = parse_args(["--config", str(cfg), "--batch-size", "9"])
    typed = (args.train_data, args.batch_size, args.lora_rank, args.freeze_text, args.lr)
    assert typed == ("a/train", 9, 4, True, 1e-4)
    assert args.precision == "bf16" and extra_val_sets(args.extra_val_data) == {"general": "g/valid"}
    assert args.same_text_positives is False and args.seed == 123
    assert (args.max_epochs, args.wd, args.warmup, args.name) == (32, 0.2, 500, "train_clip")
    assert args.context_length is None  # inherited from the starting checkpoint, else 52


def test_params_json_holds_every_flag_resolved_and_as_typed(tmp_path, data):
    out = main(tiny_argv(data[0], None, tmp_path, max_steps=3, valid_epoch_interval=0, lora_rank=2))
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert params == json.loads(json.dumps(out["params"]))
    typed = params.pop("typed")
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert set(typed) == dests == {"config", *FLAGS}
    facts = {"model_config", "world_size", "global_batch_size", "steps_per_epoch", "resumed_from", "train_pairs"}
    assert set(params) == dests | facts
    assert (typed["max_epochs"], params["max_epochs"]) == (32, 3)  # 8 pairs at batch 8: one step an epoch
    assert (typed["max_steps"], params["max_steps"], params["steps_per_epoch"]) == (3, 3, 1)
    assert (typed["beta1"], params["beta1"]) == (None, 0.9) and (typed["augment"], params["augment"]) == (None, "none")
    assert (typed["lora_alpha"], params["lora_alpha"]) == (None, 4.0)
    assert params["model_config"]["tuning"]["lora"]["alpha"] == 4.0 and params["train_pairs"] == 8
    assert {"train_data", "logs", "num_workers", "typed", "model_config"} <= NOT_SETTINGS and "lr" not in NOT_SETTINGS


BAD = [  # (flag, value or None for a switch, a fragment of the one error line)
    ("--lora-rank", "-1", "--lora-rank -1 is out of range: must be 0 or more"),
    ("--lora-alpha", "0", "must be greater than 0"),
    ("--lora-alpha", "nan", "must be a finite number"),
    ("--lora-dropout", "1", "must be in [0, 1)"),
    ("--lr", "-0.0001", "--lr -0.0001 is out of range"),
    ("--lr", "inf", "must be a finite number"),
    ("--batch-size", "0", "must be a positive integer"),
    ("--max-steps", "-3", "--max-steps -3"),
    ("--accum-freq", "0", "--accum-freq 0"),
    ("--warmup", "-1", "--warmup -1"),
    ("--beta2", "1.0", "--beta2 1.0"),
    ("--mask-ratio", "1.5", "--mask-ratio 1.5"),
    ("--seed", "-1", "must be in [0, 2^31)"),
    ("--early-stop-patience", "0", "--early-stop-patience 0"),
    ("--valid-image-cache-gb", "-1", "--valid-image-cache-gb -1.0"),
    ("--lora-targets", "(unclosed", "is not a valid regular expression"),
    ("--extra-val-data", "general", "--extra-val-data expects NAME=LMDB, got 'general'"),
    ("--max-steps", "many", "argument --max-steps: invalid int value: 'many'"),
    ("--augment", "strong", "argument --augment: invalid choice: 'strong'"),
    ("--precision", "fp8", "invalid choice: 'fp8'"),
    ("--lora-rank", None, "argument --lora-rank: expected one argument"),
    ("--use-flash-attention", None, "--use-flash-attention is not supported by this trainer"),
    ("--distillation", None, "--distillation is not supported"),
    ("--no-such-flag", None, "unrecognized arguments: --no-such-flag"),
    ("--device", "meta", "--device meta is out of range: must be auto, cpu, cuda or cuda:N"),
    ("--device", "cuda:x", "--device cuda:x is out of range"),
    ("--save-step-frequency", "-5", "--save-step-frequency -5 is out of range: must be -1 or more"),
    ("--save-epoch-frequency", "-1", "--save-epoch-frequency -1 is out of range: must be 0 or more"),
    ("--lora-alpha", "8", "--lora-alpha needs --lora-rank (LoRA is off)"),
    ("--lora-targets", ".*query", "--lora-targets needs --lora-rank"),
    ("--report-to", "wandb", "argument --report-to: invalid choice: 'wandb'"),
    ("--ema-decay", "1", "--ema-decay 1.0 is out of range: must be in [0, 1)"),
    ("--layer-decay", "0", "--layer-decay 0.0 is out of range: must be in (0, 1]"),
]


@pytest.mark.parametrize("flag, value, message", BAD)
def test_a_bad_flag_is_one_error_line_naming_it(tmp_path, capsys, data, flag, value, message):
    argv = tiny_argv(*data, tmp_path / "logs") + [flag, *([value] if value is not None else [])]
    line = error_line(capsys, argv)
    assert message in line and flag in line, line
    with pytest.raises(FlagError) as e:
        parse_args(argv)
    assert e.value.flag == flag and str(e.value) == line[len("error: ") :]
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora-rank: -1\n", "--lora-rank -1 is out of range"),
        ("distillation: true\n", "--distillation is not supported"),
        ("batch-sise: 3\n", "unknown key 'batch-sise'"),
        ("freeze-text: 3\n", "freeze-text = 3 is not true or false"),
        ("max-steps: many\n", "argument --max-steps: invalid int value: 'many'"),
        ("augment: strong\n", "argument --augment: invalid choice: 'strong'"),
    ],
)
def test_a_bad_value_in_a_config_file_names_the_file(tmp_path, capsys, data, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text + "lora-alpha: null\n", encoding="utf-8")
    line = error_line(capsys, tiny_argv(*data, tmp_path / "logs") + ["--config", str(cfg)])
    assert line.startswith(f"error: {cfg}: ") and message in line, line


@pytest.mark.parametrize("name", ["../x", "a/../../x", "ABS", ".", ""])
def test_a_name_that_leaves_logs_is_refused(tmp_path, capsys, data, name):
    name = str(tmp_path / "abs") if name == "ABS" else name
    line = error_line(capsys, tiny_argv(*data, tmp_path / "deep" / "logs", name=name, max_steps=1))
    assert "--name" in line and "leaves --logs" in line
    assert not (tmp_path / "deep").exists() and not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()
    assert parse_args(["--train-data", "t", "--name", "exp/run1"]).name == "exp/run1"


@pytest.mark.parametrize("where", ["logs_is_file", "logs_under_file", "run_is_file"])
def test_logs_that_is_or_sits_under_a_file(tmp_path, capsys, data, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    logs = {"logs_is_file": blocker, "logs_under_file": blocker / "logs", "run_is_file": tmp_path}[where]
    line = error_line(capsys, tiny_argv(*data, logs, name="blocker" if where == "run_is_file" else "run", max_steps=1))
    assert ("--logs" in line or "run folder" in line) and "file" in line
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("kind", ["soup", "ensemble", "study", "lmdb", "data"])
def test_a_run_folder_of_another_kind_or_inside_data_is_refused(tmp_path, capsys, data, kind):
    logs = tmp_path / "logs"
    if kind in ("lmdb", "data"):  # the run folder would lie inside an LMDB split or a MUGE data folder
        logs = make_split(tmp_path / "split", per_colour=1, colours=2) if kind == "lmdb" else tmp_path
        (tmp_path / "valid_texts.jsonl").write_text("")
    else:
        (logs / "run").mkdir(parents=True)
        (logs / "run" / MARKER).write_text(kind)
    line = error_line(capsys, tiny_argv(*data, logs, max_steps=1))
    assert line.startswith("error: run folder ") and f"{kind} folder" in line, line
    assert not (logs / "run" / "params.json").exists()


def test_bad_data_model_and_package_inputs_are_one_line(tmp_path, capsys, data, monkeypatch):
    line = error_line(capsys, tiny_argv(tmp_path / "nope", None, tmp_path))
    assert "--train-data" in line and "nope" in line
    bad = tmp_path / "bad"
    for sub in ("imgs", "pairs"):
        (bad / sub).mkdir(parents=True)
        (bad / sub / "data.mdb").write_bytes(b"this is not an lmdb file" * 100)
    line = error_line(capsys, tiny_argv(data[0], bad, tmp_path))
    assert "--val-data" in line and "bad" in line
    write_split(tmp_path / "empty", [], [])
    assert "empty split" in error_line(capsys, tiny_argv(tmp_path / "empty", None, tmp_path))
    argv = tiny_argv(data[0], None, tmp_path)
    argv[argv.index("ViT-Tiny")] = "ViT-Nope"
    assert "unknown model name 'ViT-Nope'" in error_line(capsys, argv)
    assert "larger than the 8 training pairs" in error_line(capsys, tiny_argv(data[0], None, tmp_path, batch_size=1000))
    line = error_line(capsys, tiny_argv(data[0], None, tmp_path, text_prompt="这是一张很长很长很长的商品图片的描述："))
    assert "--text-prompt" in line and "context length of 16" in line
    assert "checkpoint not found" in error_line(capsys, tiny_argv(data[0], None, tmp_path, resume=tmp_path / "x.pt"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    line = error_line(capsys, tiny_argv(*data, tmp_path, max_steps=1, report_to="tensorboard"))
    assert "--report-to tensorboard needs TensorBoard: pip install" in line


def test_nan_loss_stops_without_overwriting_checkpoints(tmp_path, capsys, data, monkeypatch):
    import solution.training.step as step

    main(tiny_argv(*data, tmp_path, max_steps=1))
    latest = tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    before = latest.read_bytes()
    real = step.clip_loss
    monkeypatch.setattr(step, "clip_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    line = error_line(capsys, tiny_argv(*data, tmp_path, max_steps=3, allow_changed_flags=True))
    assert "loss is nan" in line
    assert latest.read_bytes() == before
    assert sorted(p.name for p in latest.parent.iterdir()) == ["best.pt", "epoch_1.pt", "epoch_latest.pt"]


def test_a_cn_clip_training_checkpoint_starts_at_its_offset(tmp_path, data, tiny_config):
    """As cn_clip's trainer writes it (module. keys + optimizer, no config): its step is the data offset; optimizer
    state of the right count but other shapes gives a fresh optimizer."""
    from solution.training.setup import make_optimizer

    torch.manual_seed(0)
    model = build_model(tiny_config)
    opt = make_optimizer(model, SimpleNamespace(lr=2e-3, beta1=0.9, beta2=0.98, eps=1e-6, wd=0.01, layer_decay=1))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    ids = sd["param_groups"][1]["params"]
    sd["state"][ids[0]], sd["state"][ids[1]] = sd["state"][ids[1]], sd["state"][ids[0]]  # shapes swapped
    path, weights = tmp_path / "epoch1.pt", {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "step": 4, "name": "cnclip", "state_dict": weights, "optimizer": sd}, path)
    out = main(tiny_argv(data[0], None, tmp_path, resume=path, max_steps=6, valid_epoch_interval=0))
    assert out["params"]["resumed_from"] == str(path) and read_checkpoint(out["last_checkpoint"])["step"] == 6
    assert [r["step"] for r in metrics(tmp_path / "run")] == [5, 6]


def test_prompt_and_context_length_follow_the_starting_checkpoint(tmp_path, data, monkeypatch):
    """Unless given, both come from the starting checkpoint; the prompt reaches every batch and the validation."""
    from cn_clip_patch.prompt import tokenize
    from solution.training import loaders, validation

    batches, validated, real = [], [], validation.encode_split

    class Recording(loaders.PairCollate):
        def __call__(self, batch):
            out = super().__call__(batch)
            batches.append((self.prompt, out[1]))
            return out

    def encode(model, split, config, *a, **k):
        validated.append(config.text_prompt)
        return real(model, split, config, *a, **k)

    monkeypatch.setattr(loaders, "PairCollate", Recording)
    monkeypatch.setattr(validation, "encode_split", encode)
    cfg = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=24, text_prompt="图片：")
    start = save_checkpoint(tmp_path / "start.pt", build_model(cfg).state_dict(), cfg)
    argv = tiny_argv(*data, tmp_path, resume=start, max_steps=2)
    del argv[argv.index("--context-length") : argv.index("--context-length") + 2]
    out = main(argv)
    stored = read_checkpoint(out["last_checkpoint"])["config"]
    assert (stored["context_length"], stored["text_prompt"], out["params"]["text_prompt"]) == (24, "图片：", "图片：")
    ids = tokenize([""], 24, "图片：")[0, :-1]  # [CLS] + the prompt's pieces
    assert batches and all(p == "图片：" and torch.equal(t[:, : len(ids)], ids.expand(len(t), -1)) for p, t in batches)
    assert validated and set(validated) == {"图片："}
    out = main(argv + ["--name", "other", "--text-prompt", "", "--context-length", "20"])
    stored = read_checkpoint(out["last_checkpoint"])["config"]
    assert (stored["context_length"], stored["text_prompt"]) == (20, "")


def test_a_start_is_trained_as_the_architecture_it_records(tmp_path, caplog):
    info = {**ModelConfig("ViT-Tiny", "RBT-Tiny").model_info, "image_resolution": 32}  # not the registry's 64
    config = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=16, text_prompt="图片：", model_info=info)
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "start.pt", build_model(config).state_dict(), config)
    args = parse_args(["--train-data", "x", "--resume", str(path), "--context-length", "24"])
    got = flags.model_config(args, Start(read_checkpoint(path), str(path)))
    assert (got.model_info, got.context_length, got.text_prompt) == (info, 24, "图片：")
    assert "context_length is 16 in the checkpoint but 24 on the command line" in caplog.text

"""The run folder under hostile inputs and faults: two writers, changed flags, kill -9 in a save,
out-of-range numbers, names that leave --logs, --logs that is a file, another architecture, a full disk."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from train_helpers import hooked_train, make_data, tiny_argv

from solution.common import run_cli
from solution.model import ModelConfig, build_model, read_checkpoint, save_checkpoint
from solution.training.flags import parse_args
from solution.training.trainer import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("colours"), per_colour_train=3, per_colour_valid=1, colours=4)


def _error_line(capsys, argv, main_fn=main):
    assert run_cli(main_fn, argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def _wait(proc, ready: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready.exists():
        time.sleep(0.05)
    assert proc.poll() is None and ready.exists(), (
        f"the hooked run did not reach its hook: {proc.stderr.read()[-2000:]}"
    )


def _files(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".train.lock"
    }


# ---------------------------------------------------------------- one writer per run folder


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(tmp_path, capsys, data):
    argv = tiny_argv(*data, tmp_path / "logs", max_steps=3, valid_epoch_interval=0)
    proc, ready = hooked_train(tmp_path, argv, file="epoch_latest.pt", action="pause")
    try:
        _wait(proc, ready)
        run = tmp_path / "logs" / "run"
        before = _files(run)
        line = _error_line(capsys, argv)
        assert f"pid {proc.pid}" in line and str(run) in line and "in use" in line
        assert _files(run) == before  # the refused writer wrote nothing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert _temps(run)  # the killed writer left its temporary checkpoint
    out = main(argv)  # the kernel dropped the dead writer's lock: the same command now runs
    assert read_checkpoint(out["last_checkpoint"])["step"] == 3
    assert _temps(run) == []


# ---------------------------------------------------------------- changed flags on resume


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("base")
    main(tiny_argv(*data, logs, max_steps=2, valid_epoch_interval=0))
    return logs


def _copy(finished_run, tmp_path) -> Path:
    shutil.copytree(finished_run, tmp_path / "logs")
    return tmp_path / "logs"


CHANGES = {
    "lr": ({"lr": "1e-3"}, "--lr 0.002 -> 0.001"),
    "batch": ({"batch_size": 4}, "--batch-size x processes 8 -> 4"),
    "steps": ({"max_steps": 4}, "max steps (--max-steps/--max-epochs) 2 -> 4"),
    "lora": ({"lora_rank": 4}, "--lora-rank 0 -> 4"),
    "freeze": ({"freeze_vision": True}, "--freeze-vision False -> True"),
    "prompt": ({"text_prompt": "图片："}, "--text-prompt '' -> '图片：'"),
    "seed": ({"seed": 7}, "--seed 123 -> 7"),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_resuming_under_changed_flags_is_refused_listing_them(finished_run, tmp_path, capsys, data, case):
    logs = _copy(finished_run, tmp_path)
    before = _files(logs / "run")
    flags, expected = CHANGES[case]
    argv = tiny_argv(*data, logs, **{"max_steps": 2, "valid_epoch_interval": 0, **flags})
    line = _error_line(capsys, argv)
    assert expected in line and "params.json" in line and "--allow-changed-flags" in line
    assert _files(logs / "run") == before


def test_harmless_flag_changes_resume_and_consent_applies_the_new_flags(finished_run, tmp_path, capsys, data):
    logs = _copy(finished_run, tmp_path)
    argv = tiny_argv(*data, logs, max_steps=2, valid_epoch_interval=0)
    argv[argv.index("--log-interval") + 1] = "5"
    argv[argv.index("--device") + 1] = "auto" if not torch.cuda.is_available() else "cpu"
    assert run_cli(main, argv + ["--valid-batch-size", "4", "--save-epoch-frequency", "2"]) == 0
    argv = tiny_argv(*data, logs, max_steps=4, valid_epoch_interval=0, lr="1e-3")
    assert run_cli(main, argv + ["--allow-changed-flags"]) == 0
    params = json.loads((logs / "run" / "params.json").read_text())
    assert params["lr"] == 1e-3 and params["max_steps"] == 4
    assert params["flag_changes"] == [
        {"step": 2, "changes": {"--lr": [0.002, 0.001], "max steps (--max-steps/--max-epochs)": [2, 4]}}
    ]
    assert read_checkpoint(logs / "run" / "checkpoints" / "epoch_latest.pt")["step"] == 4
    assert params["typed"]["lr"] == 1e-3 and params["typed"]["allow_changed_flags"] is True


def _old_style(params: dict) -> dict:
    """``params.json`` as the trainer wrote it before it recorded the typed flags: the parsed namespace
    after setup had rewritten it in place (device and LoRA flags as typed), plus the run's facts."""
    typed = params.pop("typed")
    return {
        **params,
        "device": typed["device"],
        "lora_alpha": typed["lora_alpha"],
        "lora_targets": typed["lora_targets"],
    }


def test_a_params_json_of_the_old_layout_still_guards_the_resume(finished_run, tmp_path, capsys, data):
    logs = _copy(finished_run, tmp_path)
    path = logs / "run" / "params.json"
    new = json.loads(path.read_text())
    assert new["typed"]["max_steps"] == 2 and new["typed"]["lr"] == 2e-3 and new["typed"]["beta1"] is None
    assert new["max_steps"] == 2 and new["max_epochs"] == 1 and new["beta1"] == 0.9 and new["augment"] == "none"
    old = _old_style(new)
    old["flag_changes"] = [{"step": 1, "changes": {"--lr": [0.004, 0.002]}}]
    path.write_text(json.dumps(old))
    line = _error_line(capsys, tiny_argv(*data, logs, max_steps=2, valid_epoch_interval=0, lr="1e-3"))
    assert "--lr 0.002 -> 0.001" in line and "--allow-changed-flags" in line
    line = _error_line(capsys, tiny_argv(*data, logs, max_steps=2, valid_epoch_interval=0, lora_rank=2))
    assert "--lora-rank 0 -> 2" in line
    assert json.loads(path.read_text()) == old  # refused: untouched
    argv = tiny_argv(*data, logs, max_steps=3, valid_epoch_interval=0)
    assert run_cli(main, argv + ["--allow-changed-flags"]) == 0
    params = json.loads(path.read_text())
    assert params["max_steps"] == 3 and params["typed"]["max_steps"] == 3
    assert params["flag_changes"] == [
        old["flag_changes"][0],
        {"step": 2, "changes": {"max steps (--max-steps/--max-epochs)": [2, 3]}},
    ]


# ---------------------------------------------------------------- kill -9 in the last saves


@pytest.mark.parametrize("file, nth", [("epoch_2.pt", 1), ("epoch_latest.pt", 6)])
def test_kill_during_the_final_saves_then_rerun_writes_what_it_owes(tmp_path, data, file, nth):
    # 12 pairs at batch 8: 2 steps per epoch, 2 epochs; a step checkpoint after every step. The last
    # epoch_latest.pt write is the 6th (steps 1, 2, end of epoch 1, steps 3, 4, end of epoch 2).
    argv = tiny_argv(*data, tmp_path / "logs", max_epochs=2, save_step_frequency=1)
    proc, ready = hooked_train(tmp_path, argv, file=file, action="kill", nth=nth)
    try:
        assert proc.wait(timeout=180) == -signal.SIGKILL, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    run = tmp_path / "logs" / "run"
    assert any(n.startswith(f".{file}.") for n in _temps(run))
    assert not (run / "checkpoints" / "epoch_2.pt").exists()
    (run / ".curves.png.x1y2z3.tmp").write_bytes(b"half a png")  # as a killed search trial leaves

    out = main(argv)
    ckpts = run / "checkpoints"
    assert _temps(run) == []
    final, latest = read_checkpoint(ckpts / "epoch_2.pt"), read_checkpoint(ckpts / "epoch_latest.pt")
    assert final["step"] == latest["step"] == 4 and final["epoch"] == 2
    assert all(torch.equal(final["state_dict"][k], latest["state_dict"][k]) for k in final["state_dict"])
    assert latest["train_state"]["position"] == {"epoch": 2, "micro": 0}
    rows = [json.loads(x) for x in open(run / "metrics.jsonl", encoding="utf-8")]
    assert [r["step"] for r in rows if r["kind"] == "valid"] == [2, 4]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert out["best_checkpoint"] and read_checkpoint(out["best_checkpoint"])["step"] == out["best"]["step"]
    again = main(argv)  # a finished run re-run: nothing to do, nothing rewritten
    assert again["last_checkpoint"] == out["last_checkpoint"]
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl", encoding="utf-8")] == [r["step"] for r in rows]


def test_rerun_of_an_early_stopped_run_does_not_train_on(tmp_path, data):
    argv = tiny_argv(
        *data,
        tmp_path,
        max_steps=8,
        valid_step_interval=1,
        early_stop_patience=2,
        lr="0",
        skip_scheduler=True,
        save_step_frequency=1,
    )
    out = main(argv)
    assert out["best"]["step"] == 1 and read_checkpoint(out["last_checkpoint"])["step"] == 3
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = main(argv)
    assert read_checkpoint(again["last_checkpoint"])["step"] == 3
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


# ---------------------------------------------------------------- numbers out of range


BAD_NUMBERS = [
    ("--lora-rank", "-1"),
    ("--lora-alpha", "0"),
    ("--lora-alpha", "-4"),
    ("--lora-alpha", "nan"),
    ("--lora-dropout", "1"),
    ("--lora-dropout", "-0.1"),
    ("--lr", "-0.0001"),
    ("--lr", "inf"),
    ("--wd", "-0.1"),
    ("--batch-size", "0"),
    ("--valid-batch-size", "-1"),
    ("--max-epochs", "0"),
    ("--max-steps", "-3"),
    ("--accum-freq", "0"),
    ("--warmup", "-1"),
    ("--num-workers", "-1"),
    ("--valid-num-workers", "-2"),
    ("--beta1", "1.0"),
    ("--beta2", "-0.5"),
    ("--eps", "0"),
    ("--valid-step-interval", "0"),
    ("--valid-epoch-interval", "-1"),
    ("--mask-ratio", "1.5"),
    ("--seed", "-1"),
    ("--early-stop-patience", "0"),
    ("--context-length", "0"),
    ("--log-interval", "0"),
    ("--lora-targets", "(unclosed"),
]


@pytest.mark.parametrize("flag, value", BAD_NUMBERS)
def test_out_of_range_numbers_are_refused_at_parsing(tmp_path, capsys, data, flag, value):
    argv = tiny_argv(*data, tmp_path / "logs")
    if flag in argv:
        del argv[argv.index(flag) : argv.index(flag) + 2]
    line = _error_line(capsys, argv + [flag, value])
    assert flag in line
    assert not (tmp_path / "logs").exists()


def test_out_of_range_number_in_a_config_file_names_the_file(tmp_path, capsys, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora-rank: -1\nlora-alpha: null\n", encoding="utf-8")
    line = _error_line(capsys, tiny_argv(*data, tmp_path / "logs") + ["--config", str(cfg)])
    assert line.startswith(f"error: {cfg}: --lora-rank -1 is out of range")


# ---------------------------------------------------------------- where a run may write


@pytest.mark.parametrize("name", ["../x", "../../x", "a/../../x", "ABS", ".", ""])
def test_a_name_that_leaves_logs_is_refused(tmp_path, capsys, data, name):
    logs = tmp_path / "deep" / "logs"
    if name == "ABS":
        name = str(tmp_path / "abs")
    line = _error_line(capsys, tiny_argv(*data, logs, name=name, max_steps=1))
    assert "--name" in line
    assert not (tmp_path / "deep").exists() and not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()


def test_a_name_with_a_subfolder_inside_logs_is_accepted():
    assert parse_args(["--train-data", "t", "--name", "exp/run1"]).name == "exp/run1"


@pytest.mark.parametrize("where", ["logs_is_file", "logs_under_file", "run_is_file"])
def test_logs_that_is_or_sits_under_a_file(tmp_path, capsys, data, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    logs = {"logs_is_file": blocker, "logs_under_file": blocker / "logs", "run_is_file": tmp_path}[where]
    name = "blocker" if where == "run_is_file" else "run"
    line = _error_line(capsys, tiny_argv(*data, logs, name=name, max_steps=1))
    assert ("--logs" in line or "run folder" in line) and "file" in line
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------- a checkpoint of another shape


@pytest.fixture
def wide_vit(tmp_path, monkeypatch):
    """A second tiny vision architecture, ViT-Wide (width 96), registered through $SOLUTION_MODEL_CONFIGS."""
    d = tmp_path / "archs"
    d.mkdir()
    (d / "ViT-Wide.json").write_text(
        json.dumps(
            {
                "embed_dim": 64,
                "image_resolution": 64,
                "vision_layers": 2,
                "vision_width": 96,
                "vision_patch_size": 8,
                "vision_head_width": 32,
            }
        )
    )
    monkeypatch.setattr("solution.model.registry.EXTRA_CONFIG_DIRS", (d,))
    cfg = ModelConfig("ViT-Wide", "RBT-Tiny", context_length=16)
    return save_checkpoint(tmp_path / "wide.pt", build_model(cfg).state_dict(), cfg)


def test_resume_with_a_checkpoint_of_another_architecture(tmp_path, capsys, data, wide_vit):
    line = _error_line(capsys, tiny_argv(*data, tmp_path / "logs", resume=wide_vit, max_steps=1))
    assert str(wide_vit) in line and "ViT-Wide" in line and "ViT-Tiny" in line


def test_own_lora_state_of_another_architecture_is_one_line(tmp_path, capsys, data, wide_vit):
    logs = tmp_path / "logs"
    main(tiny_argv(*data, logs, max_steps=1, valid_epoch_interval=0, lora_rank=2))
    argv = tiny_argv(*data, logs, max_steps=1, valid_epoch_interval=0, lora_rank=2)
    argv[argv.index("ViT-Tiny")] = "ViT-Wide"
    line = _error_line(capsys, argv + ["--allow-changed-flags"])
    assert "epoch_latest.pt" in line and "ViT-Wide" in line


def test_optimizer_state_of_other_shapes(tmp_path, capsys, data, tiny_config):
    """A cn_clip checkpoint whose optimizer state has the right count but wrong shapes: a fresh optimizer."""
    from solution.training.setup import make_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=16))
    opt = make_optimizer(model, lr=2e-3, betas=(0.9, 0.98), eps=1e-6, wd=0.01)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    ids = sd["param_groups"][1]["params"]
    sd["state"][ids[0]], sd["state"][ids[1]] = sd["state"][ids[1]], sd["state"][ids[0]]  # shapes swapped
    path = tmp_path / "cnclip.pt"
    torch.save(
        {
            "epoch": 0,
            "step": 0,
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer": sd,
        },
        path,
    )
    out = main(tiny_argv(*data, tmp_path / "logs", resume=path, max_steps=1, valid_epoch_interval=0))
    assert read_checkpoint(out["last_checkpoint"])["step"] == 1


# ---------------------------------------------------------------- a full disk


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("what", ["checkpoint", "metrics"])
def test_disk_full_while_saving(small_disk, tmp_path, capsys, data, what):
    disk = small_disk(128)
    logs = disk / "logs"
    save_every = 1 if what == "checkpoint" else -1
    argv = tiny_argv(
        *data, logs, max_steps=3, save_step_frequency=save_every, valid_step_interval=1, valid_epoch_interval=0
    )
    filled = []

    def fill_at_step(record):  # after metrics.jsonl's valid row and best.pt, before the step's checkpoints
        if record["step"] == (2 if what == "checkpoint" else 1):
            if what == "metrics":  # fill metrics.jsonl's last page (blank lines), so its next line needs a new one
                metrics = logs / "run" / "metrics.jsonl"
                with open(metrics, "a") as f:
                    f.write("\n" * (-metrics.stat().st_size % 4096))
            filled.append(_fill(disk))

    line = _error_line(capsys, argv, lambda a: main(a, on_validation=fill_at_step))
    target = logs / "run" / ("checkpoints/epoch_" if what == "checkpoint" else "metrics.jsonl")
    assert line.startswith(f"error: disk full at {target}")
    if what == "checkpoint":
        ckpts = logs / "run" / "checkpoints"
        assert read_checkpoint(ckpts / "epoch_latest.pt")["step"] == 1  # the previous checkpoint is kept, whole
    assert _temps(logs) == []
    filler = filled[0]
    filler.unlink()
    out = main(argv)  # room again: the same command finishes the run
    assert read_checkpoint(out["last_checkpoint"])["step"] == 3

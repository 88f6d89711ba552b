"""The run folder under faults: stopped anywhere and re-run as if never stopped; two writers; a full disk."""

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import scalars, snapshot
from train_helpers import error_line, make_data, metrics, paused_train, tiny_argv

from solution.common import run_cli
from solution.model import ModelConfig, build_model, read_checkpoint, save_checkpoint
from solution.training import trainer
from solution.training.trainer import main

TIMING = ("time", "data_time", "batch_time", "pairs_per_s", "seconds")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("colours"), per_colour_train=3, per_colour_valid=1, colours=4)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def outcome(run: Path) -> tuple[dict, list]:
    """A run folder's checkpoints (step and every tensor) and metrics lines without their timings."""
    ckpts = {}
    for p in sorted(run.glob("*/*.pt")):
        c = torch.load(p, map_location="cpu", weights_only=True)
        tensors = c.get("state_dict") or c["adapter"]
        ckpts[str(p.relative_to(run))] = (c["step"], dict(tensors))
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run)]
    return ckpts, rows


# 12 pairs at batch 4: 3 steps an epoch, 2 epochs; epoch_latest.pt (and epoch_E_S.pt) after each step,
# validation at steps 2, 3 (the end of epoch 1), 4 and 6; the EMA validated and saved, TensorBoard on
FLAGS = dict(batch_size=4, max_epochs=2, save_step_frequency=1, valid_step_interval=2, augment="gentle")
FLAGS.update(ema_decay=0.75, layer_decay=0.5, report_to="tensorboard")
TAGS = {"train": ("loss", "lr", "logit_scale"), "valid": ("r1", "r5", "r10", "mean_recall", "val_loss")}


def assert_board_is_metrics(run: Path) -> None:
    """TensorBoard's own reader finds each metrics line's values (as float32) at its step, once."""
    got = sorted((tag, step, v) for tag, events in scalars(run / "tensorboard").items() for step, v in events)
    rows = metrics(run)
    tags = [(r, "train" if r["kind"] == "train" else f"valid/{r['set']}", k) for r in rows for k in TAGS[r["kind"]]]
    assert got == sorted((f"{tag}/{k}", r["step"], float(np.float32(r[k]))) for r, tag, k in tags)


class Stopped(BaseException):
    """A stop as abrupt as a kill: nothing in the trainer catches it."""


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ref")
    main(tiny_argv(*data, logs, **FLAGS))
    return logs / "run"


def stop_at(m: pytest.MonkeyPatch, file: str, step: int, start: int) -> None:
    """Raise :class:`Stopped` in training step ``step`` (``file`` "step"; the run resumes at step ``start``) or
    right after the temporary file of ``file`` for step ``step`` is written (before the rename)."""
    calls, real_save, real_step = [start], torch.save, trainer.Stepper.__call__

    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if os.path.basename(str(f)).startswith(f".{file}.") and obj.get("step") == step:
            raise Stopped(file)

    def in_step(self, batches):
        calls[0] += 1
        if file == "step" and calls[0] == step:
            raise Stopped(file)
        return real_step(self, batches)

    m.setattr(torch, "save", save)
    m.setattr(trainer.Stepper, "__call__", in_step)


STOPS = [  # in the order a run reaches them: each re-run goes on from where the one before it stopped
    ("best.pt", 2),
    ("epoch_latest.pt", 2),  # writing epoch_latest.pt after a validation
    ("epoch_1_2.pt", 2),  # between epoch_latest.pt and the step's checkpoint
    ("epoch_1.pt", 3),  # between epoch_latest.pt and the epoch's checkpoint
    ("step", 5),  # in the middle of an epoch, not saving
    ("epoch_latest.pt", 6),  # the final epoch_latest.pt
    ("epoch_2.pt", 6),  # the last file of the final saves
]


def test_a_run_stopped_anywhere_and_rerun_ends_as_if_never_stopped(data, uninterrupted, tmp_path, monkeypatch):
    argv, latest = tiny_argv(*data, tmp_path, **FLAGS), tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    for file, step in STOPS:  # the same command again after each stop
        start = read_checkpoint(latest)["step"] if latest.exists() else 0
        with monkeypatch.context() as m, pytest.raises(Stopped):
            stop_at(m, file, step, start)
            main(argv)
    main(argv)
    (want, want_rows), (got, got_rows) = outcome(uninterrupted), outcome(tmp_path / "run")
    assert got.keys() == want.keys() and got_rows == want_rows
    for name, (step, tensors) in want.items():
        assert got[name][0] == step and got[name][1].keys() == tensors.keys(), name
        assert all(torch.equal(v, got[name][1][k]) for k, v in tensors.items()), name
    assert_board_is_metrics(tmp_path / "run")
    files = snapshot(tmp_path / "run", locks=False)
    main(argv)  # a finished run re-run: nothing to do, nothing rewritten
    assert snapshot(tmp_path / "run", locks=False) == files


def test_the_ema_is_what_is_validated_and_saved_and_epoch_latest_keeps_both(uninterrupted):
    ckpts = {p.name: read_checkpoint(p) for p in (uninterrupted / "checkpoints").glob("*.pt")}
    latest, best = ckpts["epoch_latest.pt"], ckpts["best.pt"]
    names = [n for n, _ in build_model(ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=16)).named_parameters()]
    ema = dict(zip(names, latest["train_state"]["ema"]))
    assert all(torch.equal(ckpts["epoch_2.pt"]["state_dict"][f"module.{n}"], t) for n, t in ema.items())
    assert not all(torch.equal(latest["state_dict"][f"module.{n}"], t) for n, t in ema.items())  # the live weights
    at_best = ckpts[f"epoch_{best['epoch']}_{best['step']}.pt"]["state_dict"]  # the EMA of the best step
    assert all(torch.equal(at_best[k], v) for k, v in best["state_dict"].items())


# ---------------------------------------------------------------- one writer per run folder


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(tmp_path, capsys, data):
    argv = tiny_argv(*data, tmp_path / "logs", max_steps=3, valid_epoch_interval=0)
    proc, ready = paused_train(tmp_path, argv, "epoch_latest.pt")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not ready.exists():
            time.sleep(0.05)
        if proc.poll() is not None or not ready.exists():  # killed first: reading stderr would wait for ever
            proc.kill()
            pytest.fail(f"not paused: {proc.communicate()[1][-2000:]}")
        run = tmp_path / "logs" / "run"
        before = snapshot(run, locks=False)
        line = error_line(capsys, argv)
        assert f"pid {proc.pid}" in line and str(run) in line and "in use" in line
        assert snapshot(run, locks=False) == before  # the refused writer wrote nothing
    finally:
        proc.kill()  # SIGKILL
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


CHANGES = {
    "lr": ({"lr": "1e-3"}, "--lr 0.002 -> 0.001"),
    "batch": ({"batch_size": 4}, "--batch-size x processes 8 -> 4"),
    "steps": ({"max_steps": 4}, "max steps (--max-steps/--max-epochs) 2 -> 4"),
    "lora": ({"lora_rank": 4}, "--lora-rank 0 -> 4"),
    "freeze": ({"freeze_vision": True}, "--freeze-vision False -> True"),
    "prompt": ({"text_prompt": "图片："}, "--text-prompt '' -> '图片：'"),
    "seed": ({"seed": 7}, "--seed 123 -> 7"),
    "precision": ({"precision": "bf16"}, "--precision 'fp32' -> 'bf16'"),
}


@pytest.mark.parametrize("flags, expected", CHANGES.values(), ids=CHANGES)
def test_resuming_under_changed_flags_is_refused_listing_them(finished_run, tmp_path, capsys, data, flags, expected):
    shutil.copytree(finished_run, tmp_path / "logs")
    before = snapshot(tmp_path / "logs" / "run", locks=False)
    line = error_line(
        capsys, tiny_argv(*data, tmp_path / "logs", **{"max_steps": 2, "valid_epoch_interval": 0, **flags})
    )
    assert expected in line and "params.json" in line and "--allow-changed-flags" in line
    assert snapshot(tmp_path / "logs" / "run", locks=False) == before


def test_harmless_flag_changes_resume_and_consent_applies_the_new_flags(finished_run, tmp_path, data):
    logs = tmp_path / "logs"
    shutil.copytree(finished_run, logs)
    params = json.loads((logs / "run" / "params.json").read_text())
    # as earlier versions wrote it: the spelling typed (fp16 is amp) and a flag since dropped
    params.update(precision="fp16", torchcompile_backend="inductor")
    (logs / "run" / "params.json").write_text(json.dumps(params))
    argv = tiny_argv(*data, logs, max_steps=2, valid_epoch_interval=0, precision="amp", log_interval=5, device="auto")
    assert run_cli(main, argv + ["--valid-batch-size", "4", "--save-epoch-frequency", "2", "--num-workers", "1"]) == 0
    argv = tiny_argv(*data, logs, max_steps=4, valid_epoch_interval=0, lr="1e-3", precision="amp", wd=0.5)
    assert run_cli(main, argv + ["--allow-changed-flags"]) == 0
    params = json.loads((logs / "run" / "params.json").read_text())
    assert params["lr"] == 1e-3 and params["max_steps"] == 4 and params["precision"] == "amp"
    changes = {"--lr": [0.002, 0.001], "--wd": [0.01, 0.5], "max steps (--max-steps/--max-epochs)": [2, 4]}
    assert params["flag_changes"] == [{"step": 2, "changes": changes}]
    latest = read_checkpoint(logs / "run" / "checkpoints" / "epoch_latest.pt")
    assert latest["step"] == 4 and [g["weight_decay"] for g in latest["optimizer"]["param_groups"]] == [0.0, 0.5]
    assert params["typed"]["lr"] == 1e-3 and params["typed"]["allow_changed_flags"] is True


# ---------------------------------------------------------------- a checkpoint of another shape


def test_a_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys, data):
    cfg = ModelConfig("ViT-Tiny-W96", "RBT-Tiny", context_length=16)
    other = save_checkpoint(tmp_path / "w96.pt", build_model(cfg).state_dict(), cfg)
    line = error_line(capsys, tiny_argv(*data, tmp_path / "logs", resume=other, max_steps=1))
    assert str(other) in line and "ViT-Tiny-W96" in line and "ViT-Tiny@" in line
    logs = tmp_path / "logs2"
    main(tiny_argv(*data, logs, max_steps=1, valid_epoch_interval=0, lora_rank=2))
    argv = tiny_argv(*data, logs, max_steps=1, valid_epoch_interval=0, lora_rank=2, allow_changed_flags=True)
    argv[argv.index("ViT-Tiny")] = "ViT-Tiny-W96"
    line = error_line(capsys, argv)  # the run's own LoRA state
    assert "epoch_latest.pt" in line and "ViT-Tiny-W96" in line


# ---------------------------------------------------------------- a full disk


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 16))
            f.flush()
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

    line = error_line(capsys, argv, lambda a: main(a, on_validation=fill_at_step))
    target = logs / "run" / ("checkpoints/epoch_" if what == "checkpoint" else "metrics.jsonl")
    assert line.startswith(f"error: disk full at {target}")
    if what == "checkpoint":
        assert read_checkpoint(logs / "run" / "checkpoints" / "epoch_latest.pt")["step"] == 1  # the previous one, whole
    assert _temps(logs) == []
    filled[0].unlink()
    out = main(argv)  # room again: the same command finishes the run
    assert read_checkpoint(out["last_checkpoint"])["step"] == 3

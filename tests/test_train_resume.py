"""kill -9 in the middle of a LoRA run, re-run the same command: the same final weights as a run never killed."""

import os
import signal
import subprocess
import sys
import time

import torch
from train_helpers import make_data, tiny_argv

from solution.model import read_checkpoint
from solution.training.trainer import main


def test_kill_9_then_rerun_gives_identical_weights(tmp_path):
    train, valid = make_data(tmp_path / "data", per_colour_train=3, per_colour_valid=1, colours=4)
    flags = dict(
        max_steps=10,
        save_step_frequency=1,
        valid_epoch_interval=0,
        lora_rank=4,
        lr="1e-2",
        augment="gentle",
        lora_dropout=0.1,
    )
    ref = main(tiny_argv(train, valid, tmp_path, name="ref", **flags))

    argv = tiny_argv(train, valid, tmp_path, name="killed", **flags)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "solution.train", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().count('"train"') >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = read_checkpoint(tmp_path / "killed" / "checkpoints" / "epoch_latest.pt")["step"]
    assert 3 <= killed_at < 10
    out = main(argv)  # the same command again
    a, b = read_checkpoint(ref["last_checkpoint"]), read_checkpoint(out["last_checkpoint"])
    assert a["step"] == b["step"] == 10
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["train_state"]["adapted_state_dict"], b["train_state"]["adapted_state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [int(x.split('"step": ')[1].split(",")[0]) for x in open(tmp_path / "killed" / "metrics.jsonl")]
    assert steps == list(range(1, 11))

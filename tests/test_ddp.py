"""Two CPU processes (gloo) at batch 4 each train the same model as one process at batch 8, with and
without gradient accumulation (``--accum-freq 2``: DDP's ``no_sync`` on the first micro-batch)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import make_data, tiny_argv

from solution.model import ModelConfig, build_model, read_checkpoint
from solution.training.trainer import main

# eps = 1 makes AdamW's update proportional to the gradient (~ SGD with momentum), so a wrongly
# scaled gradient (e.g. x world size, or a micro-batch's gradient lost or counted twice) would show;
# with the usual tiny eps Adam would hide it.
FLAGS = dict(max_steps=4, lr="1.0", eps="1.0", warmup=1, valid_step_interval=2, valid_epoch_interval=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    main(argv)


def _rows(run_dir, kind: str) -> list[dict]:
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl", encoding="utf-8")) if r["kind"] == kind]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("colours"), per_colour_train=3, per_colour_valid=1)


@pytest.mark.parametrize("accum_freq", [1, 2])
def test_two_gloo_processes_equal_one_process(tmp_path, data, accum_freq):
    train, valid = data
    flags = {**FLAGS, "accum_freq": accum_freq}
    single = main(tiny_argv(train, valid, tmp_path / "logs", name="single", **{**flags, "batch_size": 8}))
    argv = tiny_argv(train, valid, tmp_path / "logs", name="ddp", **{**flags, "batch_size": 4})
    mp.spawn(_worker, args=(2, _free_port(), argv), nprocs=2, join=True)

    ddp_dir = tmp_path / "logs" / "ddp"
    a = read_checkpoint(single["last_checkpoint"])
    b = read_checkpoint(ddp_dir / "checkpoints" / "epoch_latest.pt")
    assert a["step"] == b["step"] == 4
    assert b["train_state"]["position"] == a["train_state"]["position"]
    assert len(b["train_state"]["rng"]) == 2  # one RNG state per process
    params = json.loads((ddp_dir / "params.json").read_text())
    assert (
        (params["world_size"], params["global_batch_size"])
        == (2, 8 * accum_freq)
        == (1 * 2, single["params"]["global_batch_size"])
    )
    # the oracle: the one-process run at the same global batch; the model moved away from its start
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-5, rtol=1e-4, msg=k)
    torch.manual_seed(123)
    init = build_model(ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=16)).state_dict()
    assert max(float((init[k[len("module.") :]] - v).abs().max()) for k, v in a["state_dict"].items()) > 1e-3
    # every step saw the same global loss, and validation ran once per interval (main process only)
    losses = [[r["loss"] for r in _rows(run, "train")] for run in (tmp_path / "logs" / "single", ddp_dir)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)
    assert [r["step"] for r in _rows(ddp_dir, "valid")] == [2, 4]

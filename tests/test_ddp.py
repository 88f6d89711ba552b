"""Two gloo CPU processes run ``JOBS``: at batch 4 each they train as one at batch 8; stops and errors reach all."""

import datetime
import json
import multiprocessing
import os
import socket
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from train_helpers import make_data, make_split, metrics, tiny_argv

from solution.common import SolutionError
from solution.data.datasets import train_transform
from solution.data.lmdb_io import LMDBSplit
from solution.model import ModelConfig, build_model, read_checkpoint
from solution.training.loaders import SeededPairs, epoch_order
from solution.training.setup import Dist, on_main, rank_device
from solution.training.state import to_cpu
from solution.training.step import clip_loss
from solution.training.trainer import main

pytestmark = pytest.mark.xdist_group("ddp")  # one worker starts the two processes once
TIMEOUT_S = 240  # a hang fails here; the process group's own timeout is set far beyond it (10 min)
# eps = 1 makes AdamW's update proportional to the gradient (~ SGD with momentum), so a wrongly
# scaled gradient (e.g. x world size, or a micro-batch's gradient lost or counted twice) would show;
# with the usual tiny eps Adam would hide it.
EQUAL = dict(max_steps=4, lr="1.0", eps="1.0", warmup=1, valid_step_interval=2, valid_epoch_interval=0)


def _worker(rank: int, port: int, jobs: list, out_dir: str) -> None:
    """Each job in one process group (the trainer's own is left to the caller): its result, steps and error."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    from solution.training import trainer, validation

    steps, real_step, real_score = [0], trainer.Stepper.__call__, validation.Validation.score

    def counted(self, batches):
        steps[0] += 1
        assert len({len(b[0]) for b in batches}) == 1
        return real_step(self, batches)

    def boom(*a, **k):
        raise RuntimeError("injected validation failure")

    trainer.Stepper.__call__ = counted
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    for name, argv in jobs:
        steps[0] = 0
        validation.Validation.score = boom if name == "fails" and rank == 0 else real_score
        try:
            result = {"best": trainer.main(argv)["best"], "shared": on_main(Dist(rank, 2), lambda: {"rank": rank})}
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        with open(os.path.join(out_dir, f"{name}.{rank}.json"), "w", encoding="utf-8") as f:
            json.dump({**result, "steps": steps[0]}, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("colours"), per_colour_train=3, per_colour_valid=1)


@pytest.fixture(scope="module")
def ddp(data, tmp_path_factory):
    """The jobs' results, ``ddp(name)``: one dict per process; and the logs folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    logs, valid = tmp / "logs", data[1]

    def broken(pairs):
        """In epoch 1 at batch 4 x 2 processes (seed 7), rank 0's first micro-batch holds one undecodable image
        and rank 1's second micro-batch nothing but undecodable images."""
        return {pairs[int(k)][0] for k in epoch_order(len(pairs), 8, 7, 0)[[0, 12, 13, 14, 15]]}

    bad = make_split(tmp / "train", per_colour=3, seed=1, first_image_id=1000, broken=broken)
    jobs = [(f"accum{n}", tiny_argv(*data, logs, f"accum{n}", **EQUAL, accum_freq=n, batch_size=4)) for n in (1, 2)]
    once = dict(batch_size=4, dist_timeout_min=10, valid_step_interval=1)
    jobs.append(
        ("skips", tiny_argv(bad, valid, logs, "skips", **once, max_steps=8, seed=7, early_stop_patience=2, lr=0))
    )
    jobs.append(("fails", tiny_argv(*data, logs, "fails", **once, max_steps=4, valid_epoch_interval=0)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, jobs, str(tmp))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung and [p.exitcode for p in procs] == [0, 0], f"processes {hung} hung"
    return lambda name: [json.loads((tmp / f"{name}.{r}.json").read_text()) for r in range(2)], logs


@pytest.mark.parametrize("accum_freq", [1, 2])
def test_two_gloo_processes_equal_one_process(tmp_path, data, ddp, accum_freq):
    results, logs = ddp
    assert [r["steps"] for r in results(f"accum{accum_freq}")] == [4, 4]
    single = main(tiny_argv(*data, tmp_path, name="single", **EQUAL, accum_freq=accum_freq, batch_size=8))
    ddp_dir = logs / f"accum{accum_freq}"
    a = read_checkpoint(single["last_checkpoint"])
    b = read_checkpoint(ddp_dir / "checkpoints" / "epoch_latest.pt")
    assert a["step"] == b["step"] == 4
    assert b["train_state"]["position"] == a["train_state"]["position"]
    assert len(b["train_state"]["rng"]) == 2  # one RNG state per process
    params = json.loads((ddp_dir / "params.json").read_text())
    assert (params["world_size"], params["global_batch_size"]) == (2, 8 * accum_freq)
    assert single["params"]["global_batch_size"] == 8 * accum_freq
    # the oracle: the one-process run at the same global batch; the model moved away from its start
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-5, rtol=1e-4, msg=k)
    torch.manual_seed(123)
    init = build_model(ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=16)).state_dict()
    assert max(float((init[k[len("module.") :]] - v).abs().max()) for k, v in a["state_dict"].items()) > 1e-3
    # every step saw the same global loss, and validation ran once per interval (main process only)
    losses = [[r["loss"] for r in metrics(run, "train")] for run in (tmp_path / "single", ddp_dir)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)
    assert [r["step"] for r in metrics(ddp_dir, "valid")] == [2, 4]


def test_a_skipped_batch_and_an_early_stop_reach_every_process(ddp):
    """Rank 0's first micro-batch is completed from its own pairs, rank 1's second is empty: both skip that step;
    lr 0: the best is step 1's and two validations later (step 3) both processes stop."""
    results, logs = ddp
    results = results("skips")
    assert [r["steps"] for r in results] == [3, 3], results
    assert results[0]["best"]["step"] == 1 and results[1]["best"] == results[0]["best"]
    ckpt = read_checkpoint(logs / "skips" / "checkpoints" / "epoch_latest.pt")
    assert ckpt["step"] == 3 and ckpt["train_state"]["bad_validations"] == 2
    assert ckpt["train_state"]["best"] == results[0]["best"]
    assert (logs / "skips" / "checkpoints" / "best.pt").is_file()
    assert [r["shared"] for r in results] == [{"rank": 0}] * 2  # the main process's answer reaches the other


def test_an_error_in_the_main_process_validation_ends_every_process(ddp):
    results = ddp[0]("fails")
    assert results[0]["error"] == "RuntimeError: injected validation failure"
    assert (
        results[1]["error"]
        == "SolutionError: stopped: the main process raised RuntimeError: injected validation failure"
    )
    assert [r["steps"] for r in results] == [1, 1]


# ---------------------------------------------------------------- helpers of the GPU path


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank():
    assert rank_device(torch.device("cuda", 3), 1, 4) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda"), 0, 2) == torch.device("cuda", 0)
    assert rank_device(torch.device("cuda"), 1, 2) == torch.device("cuda", 1)
    with pytest.raises(SolutionError, match="LOCAL_RANK 2 but only 2 CUDA devices"):
        rank_device(torch.device("cuda"), 2, 2)


def test_to_cpu_moves_every_tensor_of_nested_state():
    fake = mock.MagicMock(spec=torch.Tensor)  # a tensor that reports being elsewhere: only .cpu() brings it home
    real = torch.arange(3.0, requires_grad=True)
    out = to_cpu({"a": [fake, (1, fake)], "b": {"c": fake, "r": real}, "n": 3, "s": "x"})
    moved = fake.detach.return_value.cpu.return_value
    assert out["a"][0] is moved and out["a"][1] == (1, moved) and out["b"]["c"] is moved
    assert fake.detach.return_value.cpu.call_count == 3
    assert isinstance(out["a"][1], tuple) and (out["n"], out["s"]) == (3, "x")
    assert not out["b"]["r"].requires_grad and out["b"]["r"].device.type == "cpu"
    assert torch.equal(out["b"]["r"], torch.tensor([0.0, 1.0, 2.0]))


def test_the_resumable_checkpoint_is_saved_through_to_cpu(tmp_path, data, monkeypatch):
    """Optimizer state and train_state go through :func:`to_cpu`: a GPU run's checkpoint loads on a CPU."""
    from solution.training import state as state_module
    from solution.training import trainer

    seen = []

    def spy(obj):
        seen.append(obj)
        return to_cpu(obj)

    monkeypatch.setattr(trainer, "to_cpu", spy)
    monkeypatch.setattr(state_module, "to_cpu", spy)
    trainer.main(tiny_argv(data[0], None, tmp_path, max_steps=1, lora_rank=2))
    kinds = [set(o) for o in seen if isinstance(o, dict)]
    assert {"state", "param_groups"} in kinds  # the optimizer's state dict
    assert any({"rng", "adapted_state_dict", "position", "ema"} <= k for k in kinds)  # train_state
    assert any(k and all("lora_" in n for n in k) for k in kinds)  # the adapter tensors


def test_clip_loss_is_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    scale = torch.tensor(10.0)
    ref_loss, ref_logits = clip_loss(img, txt, scale, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = clip_loss(img, txt, scale, None)
    assert logits.dtype == loss.dtype == torch.float32
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)


def test_per_sample_augmentation_seeds_leave_the_cuda_generators_alone(tmp_path, monkeypatch):
    split = LMDBSplit(make_split(tmp_path / "s", per_colour=1, colours=2))
    ds = SeededPairs(split, train_transform(16, "gentle"), seed=3, random_transform=True)
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(s))
    a, b = ds[(0, 5, 0)], ds[(0, 5, 0)]
    assert calls == []
    assert torch.equal(a[0], b[0])  # still reproducible per (seed, epoch, position)
    c = ds[(0, 6, 0)]
    assert not torch.equal(a[0], c[0])

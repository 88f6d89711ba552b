"""Multi-process hazards on CPU with 2 gloo processes (each run under a timeout, so a hang fails the test
instead of blocking it): an early stop and a skipped batch reach every process, an error in the main process's
validation ends them all, answers of the main process reach the others; and the device, seed and save helpers
of the GPU path."""

import base64
import datetime
import json
import multiprocessing
import os
import random
import socket
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from train_helpers import COLOURS, _png, make_data, make_split, tiny_argv

from solution.common import SolutionError
from solution.data.datasets import train_transform
from solution.data.lmdb_io import LMDBSplit, write_split
from solution.model import read_checkpoint
from solution.training.loaders import SeededPairs, epoch_order
from solution.training.setup import Dist, on_main, rank_device
from solution.training.state import to_cpu
from solution.training.step import clip_loss

TIMEOUT_S = 150  # a hang fails here; the process group's own timeout is set far beyond it (10 min)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker(rank: int, port: int, argv: list, out_dir: str, fault: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    from solution.training import trainer, validation

    steps, real = [0], trainer.Stepper.__call__

    def counted(self, batches):
        steps[0] += 1
        assert len({len(b[0]) for b in batches}) == 1
        return real(self, batches)

    trainer.Stepper.__call__ = counted
    if fault == "validation" and rank == 0:

        def boom(*a, **k):
            raise RuntimeError("injected validation failure")

        validation.Validation.score = boom
    result = {"ok": False}
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))  # the trainer's, left to the caller
    try:
        result = {"ok": True, "best": trainer.main(argv)["best"]}
        d = Dist(rank, 2)
        result.update(shared=on_main(d, lambda: {"rank": rank}))
    except BaseException as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        raise
    finally:
        result["steps"] = steps[0]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)
        dist.destroy_process_group()


def _train(tmp_path, argv, fault: str = "") -> tuple[list[int], list[dict]]:
    """Two spawned trainer processes (a process still alive at the deadline fails the test): exit codes, results."""
    ctx, port = multiprocessing.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_train_worker, args=(r, port, argv, str(tmp_path), fault)) for r in range(2)]
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
    assert not hung, f"processes {hung} hung"
    return [p.exitcode for p in procs], [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("colours"), per_colour_train=3, per_colour_valid=1)


def _split_with_bad_images(split_dir, seed: int):
    """24 pairs (3 per colour); in epoch 1 at batch 4 x 2 processes, rank 0's first micro-batch holds
    one undecodable image and rank 1's second micro-batch holds nothing but undecodable images."""
    rng, images, pairs, image_id = random.Random(1), [], [], 1000
    for c, (name, rgb) in enumerate(COLOURS):
        for _ in range(3):
            images.append((image_id, _png(rgb, rng)))
            pairs.append((image_id, c, name))
            image_id += 1
    rng.shuffle(pairs)
    order = epoch_order(len(pairs), 8, seed, 0)
    bad = {pairs[int(order[k])][0] for k in (0, 12, 13, 14, 15)}
    junk = base64.urlsafe_b64encode(b"not an image")
    write_split(split_dir, [(i, junk if i in bad else b) for i, b in images], pairs)
    return split_dir


def test_a_skipped_batch_and_an_early_stop_reach_every_process(tmp_path, data):
    """Rank 0's first micro-batch is completed from its own pairs, rank 1's second is empty: both skip that step;
    lr 0: the best is step 1's and two validations later (step 3) both processes stop."""
    train = _split_with_bad_images(tmp_path / "train", seed=7)
    flags = dict(
        batch_size=4, max_steps=8, seed=7, valid_step_interval=1, early_stop_patience=2, lr="0", dist_timeout_min=10
    )
    codes, results = _train(tmp_path, tiny_argv(train, data[1], tmp_path / "logs", **flags))
    assert codes == [0, 0], results
    assert [r["steps"] for r in results] == [3, 3]
    assert results[0]["best"]["step"] == 1 and results[1]["best"] == results[0]["best"]
    ckpt = read_checkpoint(tmp_path / "logs" / "run" / "checkpoints" / "epoch_latest.pt")
    assert (
        ckpt["step"] == 3
        and ckpt["train_state"]["bad_validations"] == 2
        and ckpt["train_state"]["best"] == results[0]["best"]
    )
    assert (tmp_path / "logs" / "run" / "checkpoints" / "best.pt").is_file()
    assert [r["shared"] for r in results] == [{"rank": 0}] * 2


def test_an_error_in_the_main_process_validation_ends_every_process(tmp_path, data):
    flags = dict(batch_size=4, max_steps=4, valid_step_interval=2, valid_epoch_interval=0, dist_timeout_min=10)
    codes, results = _train(tmp_path, tiny_argv(*data, tmp_path / "logs", **flags), fault="validation")
    assert all(c != 0 for c in codes), (codes, results)
    assert results[0]["error"] == "RuntimeError: injected validation failure"
    assert (
        results[1]["error"]
        == "SolutionError: stopped: the main process raised RuntimeError: injected validation failure"
    )
    assert [r["steps"] for r in results] == [2, 2]


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
    """Optimizer state and train_state (RNG, LoRA adapted weights) go through :func:`to_cpu` before
    ``torch.save``, so a GPU run's checkpoint loads on a CPU-only machine."""
    from solution.training import state as state_module
    from solution.training import trainer

    seen = []

    def spy(obj):
        seen.append(obj)
        return to_cpu(obj)

    monkeypatch.setattr(trainer, "to_cpu", spy)
    monkeypatch.setattr(state_module, "to_cpu", spy)
    trainer.main(tiny_argv(*data, tmp_path, max_steps=1, lora_rank=2))
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

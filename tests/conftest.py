import dataclasses
import fcntl
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from solution.model import ModelConfig, build_model, save_checkpoint

torch.set_num_threads(1)  # tiny models: one thread is faster and leaves a core for DataLoader/subprocesses
LONGEST = ("test_readme.py", "test_pipeline.py", "test_gpu_check.py", "test_ddp.py", "test_export.py")


def pytest_collection_modifyitems(items):
    """The longest files first (most are one xdist group each), so that the workers end together."""
    items.sort(key=lambda item: item.path.name not in LONGEST)


@pytest.fixture
def tiny_config():
    return ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(mib)``: a tmpfs of that size under ``tmp_path`` (a full disk); skipped where mounting needs root."""
    mounted = []

    def mount(mib: int):
        d = tmp_path / f"disk-{len(mounted)}"
        d.mkdir()
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}M", "tmpfs", str(d)], capture_output=True, text=True
        )
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip() or r.returncode}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


# ---------------------------------------------------------------- the shared tiny world


@dataclasses.dataclass(frozen=True)
class World:
    """Demo data in MUGE layout prepared to LMDB, a random base and two fine-tunes of it. Read-only: copy to change."""

    root: Path
    data: Path  # {split}_imgs.tsv, {split}_texts.jsonl, lmdb/{train,valid,test}
    base: Path  # a random ViT-Tiny + RBT-Tiny, context length 32
    runs: tuple[Path, ...]  # run folders a and b, fine-tuned from base (other lr and seed)
    config: ModelConfig

    def lmdb(self, split: str) -> Path:
        return self.data / "lmdb" / split


def _train_run(world: Path, name: str, lr: str, seed: int) -> None:
    from solution.training.trainer import main

    data = world / "data" / "lmdb"
    main(
        f"--train-data {data / 'train'} --val-data {data / 'valid'} --resume {world / 'base.pt'} --logs {world / 'logs'}"
        f" --name {name} --batch-size 24 --max-epochs 3 --lr {lr} --warmup 1 --seed {seed} --context-length 32"
        " --precision fp32 --device cpu --num-workers 0 --valid-num-workers 0 --no-plot --no-progress".split()
    )


def _build_world(root: Path) -> None:
    from solution.data.make_lmdb import prepare
    from solution.data.synthetic import generate

    data = root / "data"
    generate(data, preset="tiny", messy=False, train_queries=24, valid_queries=16, test_queries=8, images_per_query=3)
    prepare(data, ["train", "valid", "test"], progress=False)
    config = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32)
    torch.manual_seed(0)
    save_checkpoint(root / "base.pt", build_model(config).state_dict(), config)
    for name, lr, seed in (("a", "2e-3", 0), ("b", "7e-4", 1)):
        _train_run(root, name, lr, seed)


@pytest.fixture(scope="session")
def world(tmp_path_factory, worker_id) -> World:
    """Built once per test run, whatever the number of xdist workers (the first to ask builds, the others wait)."""
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "world"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".done").exists():
            _build_world(root)
            (root / ".done").touch()
    return World(
        root,
        root / "data",
        root / "base.pt",
        (root / "logs" / "a", root / "logs" / "b"),
        ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32),
    )

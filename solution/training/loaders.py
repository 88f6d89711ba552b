"""Training/validation data for the trainer: a resumable, rank-aware, deterministic order.

Epoch ``e`` visits the pairs in ``randperm(N, seed + e)``, padded by wrapping around to a whole
number of global micro-batches (as cn_clip pads its dataset). Global micro-batch ``b`` is
``order[b*G:(b+1)*G]`` with ``G = batch_size x world``; rank ``r`` takes its ``r``-th slice. So the
data position is just ``(epoch, micro-batch index)`` and a resumed run, or a run with another
number of processes at the same global batch, sees exactly the same global batches.

Augmentations are made reproducible per sample: each sample's transform runs under an RNG seeded
from ``(seed, epoch, position)``, so neither DataLoader workers nor resuming change them.

A run's training loader is built once (:class:`TrainBatches`, persistent workers when
``--num-workers`` > 0) and moved from epoch to epoch through its sampler's ``set_epoch``: the
same batches as a loader built for each epoch, without restarting the workers every epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from solution.common import SolutionError
from solution.data.datasets import PairCollate, PairDataset, eval_transform, train_transform
from solution.data.lmdb_io import LMDBSplit


def open_split(path: str | None, what: str) -> LMDBSplit:
    """Open an LMDB split with pairs; one clear error for missing, malformed or empty."""
    if not path:
        raise SolutionError(f"{what}: no LMDB directory given")
    try:
        split = LMDBSplit(path)
    except SolutionError as e:
        raise SolutionError(f"{what}: {e}") from None
    except Exception as e:  # lmdb.Error and friends: a damaged database
        raise SolutionError(f"{what}: cannot read LMDB at {path} ({type(e).__name__}: {e})") from None
    if split.num_samples <= 0 or split.num_images <= 0:
        raise SolutionError(f"{what}: {path} is an empty split ({split.num_images} images, {split.num_samples} pairs)")
    try:
        split.pair(0)
    except SolutionError as e:
        raise SolutionError(f"{what}: {e}") from None
    return split


def epoch_order(num_samples: int, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(num_samples, generator=g)
    pad = (-num_samples) % global_batch
    if pad:
        order = torch.cat([order, order[:pad]])
    return order


def num_micro_batches(num_samples: int, global_batch: int) -> int:
    return -(-num_samples // global_batch)


class EpochBatchSampler(Sampler):
    """This rank's micro-batches of one epoch, from micro-batch ``start`` on; :meth:`set_epoch` moves it to
    another epoch (so one DataLoader, with persistent workers, serves the whole run).

    Each sample key is ``(epoch, position in epoch, sample index)``: the dataset reads the epoch from
    the key, not from its own state, because persistent workers hold copies of the dataset made when
    they started."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        epoch: int,
        start: int = 0,
        stop: int | None = None,
    ):
        self.num_samples, self.seed = num_samples, seed
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.global_batch = batch_size * world
        self.set_epoch(epoch, start, stop)

    def set_epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> None:
        """Serve epoch ``epoch``'s micro-batches ``start`` .. ``stop`` (default: to the epoch's end)."""
        self.order = epoch_order(self.num_samples, self.global_batch, self.seed, epoch)
        self.epoch = epoch
        total = len(self.order) // self.global_batch
        self.start, self.stop = start, total if stop is None else min(stop, total)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        epoch = self.epoch
        for b in range(self.start, self.stop):
            lo = b * self.global_batch + self.rank * self.batch_size
            # (epoch, position in epoch, sample index): epoch and position seed the sample's augmentation
            yield [(epoch, lo + k, int(self.order[lo + k])) for k in range(self.batch_size)]


class SeededPairs(Dataset):
    """``PairDataset`` whose random transform is seeded per (seed, epoch, position); keys are
    ``(epoch, position, index)`` (:class:`EpochBatchSampler`'s) or ``(position, index)`` (epoch ``epoch``)."""

    def __init__(self, split: LMDBSplit, transform: Callable, seed: int, epoch: int, random_transform: bool):
        self.pairs = PairDataset(split, transform)
        self.seed, self.epoch, self.random_transform = seed, epoch, random_transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        epoch, position, index = key if len(key) == 3 else (self.epoch, *key)
        if not self.random_transform:
            return self.pairs[index]
        s = (int(self.seed) * 1_000_003 + int(epoch)) * 10_000_019 + int(position)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)  # the CPU one only: torch.manual_seed would reseed CUDA too
            random.seed(s)
            try:
                return self.pairs[index]
            finally:
                random.setstate(state)


def train_loader(
    split: LMDBSplit,
    *,
    resolution: int,
    augment: str,
    context_length: int,
    prompt: str,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    epoch: int,
    start: int,
    stop: int | None,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """This rank's micro-batches of epoch ``epoch`` (``pin_memory``: for copies to a GPU).

    Its workers persist (``num_workers > 0``): move it to another epoch with
    ``loader.batch_sampler.set_epoch(epoch, start, stop)`` (or use :class:`TrainBatches`) rather than
    building another. The batches do not depend on the workers' seeds: every random transform runs
    under the RNG seeded per sample, and the order is the sampler's."""
    ds = SeededPairs(split, train_transform(resolution, augment), seed, epoch, augment != "none")
    sampler = EpochBatchSampler(split.num_samples, batch_size, rank, world, seed, epoch, start, stop)
    return DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=PairCollate(context_length, prompt, keep_size=True),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(int(seed)),
    )


class TrainBatches:
    """One training DataLoader for a whole run (its workers started once, ``persistent_workers``);
    :meth:`epoch` moves its sampler to an epoch and returns an iterator over that epoch's micro-batches,
    the same batches a loader built for that epoch alone would give. :meth:`close` (or the ``with``
    block's end) stops the workers."""

    def __init__(self, split: LMDBSplit, **kw):
        self.loader: DataLoader | None = train_loader(split, epoch=0, start=0, stop=0, **kw)

    def epoch(self, epoch: int, start: int = 0, stop: int | None = None):
        if self.loader is None:
            raise RuntimeError("TrainBatches used after close()")
        self.loader.batch_sampler.set_epoch(epoch, start, stop)
        return iter(self.loader)

    def close(self) -> None:
        self.loader = None  # the iterator (and with it the workers) goes with the last reference

    def __enter__(self) -> TrainBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def val_loader(
    split: LMDBSplit, *, resolution: int, context_length: int, prompt: str, batch_size: int, seed: int, num_workers: int
) -> DataLoader:
    """All validation pairs once, in a fixed shuffled order (cn_clip shuffles to split duplicates)."""
    ds = SeededPairs(split, eval_transform(resolution), seed, 0, False)
    order = epoch_order(split.num_samples, 1, seed, 0).tolist()
    batches = [
        [(i, order[i]) for i in range(lo, min(lo + batch_size, len(order)))] for lo in range(0, len(order), batch_size)
    ]
    return DataLoader(
        ds,
        batch_sampler=batches,
        collate_fn=PairCollate(context_length, prompt),
        num_workers=num_workers,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(int(seed)),
    )

"""Training data in a resumable, rank-aware, deterministic order: epoch e's permutation seeded by (seed, e), padded
to whole global micro-batches that ranks slice, each sample's transform seeded by (seed, epoch, position)."""

from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from solution.common import SolutionError
from solution.data.datasets import PairCollate, PairDataset, train_transform
from solution.data.lmdb_io import LMDBSplit


def open_split(path: str | None, what: str) -> LMDBSplit:
    """An LMDB split with pairs; one clear error for missing, malformed or empty."""
    try:
        split = LMDBSplit(path)
        if split.num_samples > 0:
            split.pair(0)
    except SolutionError as e:
        raise SolutionError(f"{what}: {e}") from None
    except Exception as e:  # lmdb.Error and friends: a damaged database
        raise SolutionError(f"{what}: cannot read LMDB at {path} ({type(e).__name__}: {e})") from None
    if split.num_samples <= 0 or split.num_images <= 0:
        raise SolutionError(f"{what}: {path} is an empty split ({split.num_images} images, {split.num_samples} pairs)")
    return split


def epoch_order(num_samples: int, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch)))
    return torch.cat([order, order[: (-num_samples) % global_batch]])


class EpochBatchSampler(Sampler):
    """This rank's micro-batches of an epoch as ``(epoch, position, sample)`` keys (the epoch travels to workers)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, seed: int):
        self.num_samples, self.batch_size, self.rank, self.world, self.seed = num_samples, batch_size, rank, world, seed
        self.set_epoch(0, 0, 0)

    def set_epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> None:
        self.epoch, self.order = epoch, epoch_order(self.num_samples, self.batch_size * self.world, self.seed, epoch)
        total = len(self.order) // (self.batch_size * self.world)
        self.start, self.stop = start, total if stop is None else min(stop, total)

    def __iter__(self):
        for b in range(self.start, self.stop):
            lo = (b * self.world + self.rank) * self.batch_size
            yield [(self.epoch, lo + k, int(self.order[lo + k])) for k in range(self.batch_size)]


class SeededPairs(Dataset):
    """``PairDataset`` whose random transform runs under an RNG seeded by (seed, epoch, position)."""

    def __init__(self, split: LMDBSplit, transform, seed: int, random_transform: bool):
        self.pairs, self.seed, self.random_transform = PairDataset(split, transform), seed, random_transform

    def __getitem__(self, key):
        epoch, position, index = key
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


def train_loader(split: LMDBSplit, cfg, rank: int, world: int, pin_memory: bool = False) -> DataLoader:
    """This rank's DataLoader for the whole run; ``batch_sampler.set_epoch`` picks what an iteration gives."""
    mc = cfg.model_config
    return DataLoader(
        SeededPairs(split, train_transform(mc.image_resolution, cfg.augment), cfg.seed, cfg.augment != "none"),
        batch_sampler=EpochBatchSampler(split.num_samples, cfg.batch_size, rank, world, cfg.seed),
        collate_fn=PairCollate(mc.context_length, mc.text_prompt, keep_size=True),
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(int(cfg.seed)),
    )

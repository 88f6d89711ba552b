"""The training loader built once for a run (persistent workers) gives exactly the batches of one
loader rebuilt per epoch, as the trainer built it before."""

import random

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from train_helpers import make_split

from solution.data.datasets import PairCollate, PairDataset, train_transform
from solution.training import loaders
from solution.training.loaders import TrainBatches, epoch_order, open_split


class _OldSampler(Sampler):
    """The sampler as it was: one per epoch, keys ``(position, index)``."""

    def __init__(self, num_samples, batch_size, rank, world, seed, epoch, start=0, stop=None):
        self.batch_size, self.rank, self.global_batch = batch_size, rank, batch_size * world
        self.order = epoch_order(num_samples, self.global_batch, seed, epoch)
        total = len(self.order) // self.global_batch
        self.start, self.stop = start, total if stop is None else min(stop, total)

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for b in range(self.start, self.stop):
            lo = b * self.global_batch + self.rank * self.batch_size
            yield [(lo + k, int(self.order[lo + k])) for k in range(self.batch_size)]


class _OldPairs(Dataset):
    """The dataset as it was: the epoch is its own state (one dataset per epoch)."""

    def __init__(self, split, transform, seed, epoch):
        self.pairs, self.seed, self.epoch = PairDataset(split, transform), seed, epoch

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, key):
        position, index = key
        s = (int(self.seed) * 1_000_003 + int(self.epoch)) * 10_000_019 + int(position)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)
            random.seed(s)
            try:
                return self.pairs[index]
            finally:
                random.setstate(state)


def _old_epoch(split, *, epoch, start, stop, seed, batch_size, rank, world, augment):
    ds = _OldPairs(split, train_transform(16, augment), seed, epoch)
    sampler = _OldSampler(split.num_samples, batch_size, rank, world, seed, epoch, start, stop)
    return list(
        DataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=PairCollate(16, "", keep_size=True),
            num_workers=0,
            generator=torch.Generator().manual_seed(seed + epoch),
        )
    )


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return open_split(str(make_split(tmp_path_factory.mktemp("loaders") / "train", per_colour=5, colours=4)), "train")


# (epoch, start, stop) as the trainer asks for them: a resumed first epoch, whole ones, one cut short
PLAN = [(0, 2, None), (1, 0, None), (2, 0, 3)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_persistent_loader_gives_the_rebuilt_batches(split, num_workers, monkeypatch):
    built = []

    class CountingLoader(DataLoader):
        def __init__(self, *a, **k):
            built.append(k.get("persistent_workers"))
            super().__init__(*a, **k)

    monkeypatch.setattr(loaders, "DataLoader", CountingLoader)
    kw = dict(seed=7, batch_size=3, rank=1, world=2, augment="gentle")
    with TrainBatches(split, resolution=16, context_length=16, prompt="", num_workers=num_workers, **kw) as batches:
        ours = [list(batches.epoch(e, start, stop)) for e, start, stop in PLAN]
        # an epoch left part-way (an early stop, the last step) and then another one
        it = batches.epoch(3)
        next(it)
        again = list(batches.epoch(1))
    assert built == [num_workers > 0]  # one loader for the whole run, persistent when it has workers
    for (e, start, stop), got in zip(PLAN + [(1, 0, None)], ours + [again]):
        want = _old_epoch(split, epoch=e, start=start, stop=stop, **kw)
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                assert torch.equal(a, b)
    # the epochs differ from one another (the augmentation and order do move with the epoch)
    assert not torch.equal(ours[1][0][0], ours[0][0][0])


def test_closed_batches_refuse(split):
    batches = TrainBatches(
        split,
        resolution=16,
        context_length=16,
        prompt="",
        num_workers=0,
        seed=0,
        batch_size=2,
        rank=0,
        world=1,
        augment="none",
    )
    batches.close()
    with pytest.raises(RuntimeError):
        batches.epoch(0)

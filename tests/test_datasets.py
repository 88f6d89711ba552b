"""The image transforms of :mod:`solution.data.datasets` against upstream's."""

import random

import pytest
import torch

from solution.data.datasets import eval_transform, train_transform
from solution.data.synthetic import draw_image, random_scene


def _upstream_augment(resolution: int):
    """What cn_clip's ``LMDBDataset`` builds for ``split="train", use_augment=True`` (the oracle; private)."""
    from cn_clip.training.data import LMDBDataset

    ds = LMDBDataset.__new__(LMDBDataset)  # no LMDB opened: only the two attributes the method reads
    ds.split, ds.use_augment = "train", True
    return ds._build_transform(resolution)


def _apply(transform, im, seed: int) -> torch.Tensor:
    random.seed(seed)
    torch.manual_seed(seed)
    return transform(im)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_cnclip_augment_is_upstreams_use_augment_transform(mode):
    im = draw_image(random_scene(random.Random(3), 0.5), random.Random(4), 96).convert(mode)
    ours, theirs = train_transform(64, "cnclip"), _upstream_augment(64)
    assert [type(t) for t in ours.transforms] == [type(t) for t in theirs.transforms]
    outs = []
    for seed in range(24):
        a, b = _apply(ours, im, seed), _apply(theirs, im, seed)
        assert a.shape == (3, 64, 64) and torch.equal(a, b), f"seed {seed}"
        outs.append(a)
    assert len({o.sum().item() for o in outs}) > 12  # the seeds drew different crops/policies: a real comparison


def test_cnclip_augment_differs_from_eval_and_is_random():
    im = draw_image(random_scene(random.Random(1), 0.5), random.Random(2), 96)
    aug = train_transform(64, "cnclip")
    a, b = _apply(aug, im, 0), _apply(aug, im, 1)
    assert not torch.equal(a, b)
    assert not torch.equal(a, eval_transform(64)(im))
    assert torch.equal(train_transform(64, "none")(im), eval_transform(64)(im))
    with pytest.raises(ValueError, match="unknown augment"):
        train_transform(64, "heavy")

"""A split's images decoded and resized once, kept as uint8 pixels (the eval transform cut before ``ToTensor``
+ ``Normalize``, which finish each batch elementwise as they finish each image), for encoding with many models."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from solution.data.datasets import ImageDataset, eval_transform, image_collate
from solution.data.lmdb_io import LMDBSplit
from solution.model import ModelConfig

log = logging.getLogger(__name__)

IMAGE_CACHE_BYTES = 8 << 30  # default bound of prepared pixels (MUGE's 29,806 valid images at 224 px: 4.2 GiB)


def _uint8_chw(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()


@dataclass
class PreparedImages:
    """Images of a split decoded and resized once (:func:`prepare_images`), kept as uint8 pixels."""

    image_ids: np.ndarray  # int64 [K]: the decodable ones, in the requested order
    positions: np.ndarray  # int64 [K]: each one's index among the requested ids
    pixels: torch.Tensor  # uint8 [K, 3, H, W]
    finish: Callable  # uint8 batch -> the model's input (what ToTensor + Normalize give)
    requested: int  # ids requested (decodable or not)

    def batches(self, batch_size: int):
        """``(ids, images)`` as :func:`~.encode.encode_images`'s loader gives them (undecodable ones left out)."""
        for lo in range(0, self.requested, batch_size):
            a, b = np.searchsorted(self.positions, [lo, lo + batch_size])
            if a < b:
                yield torch.from_numpy(self.image_ids[a:b]), self.finish(self.pixels[a:b])


def prepare_images(
    split: LMDBSplit | str,
    config: ModelConfig,
    *,
    image_ids: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    max_bytes: int = IMAGE_CACHE_BYTES,
    progress: bool = False,
) -> PreparedImages | None:
    """A split's images decoded and resized once for every model of ``config``'s resolution; None (decode on
    each use) above ``max_bytes`` of pixels or when the eval transform does not end in ToTensor + Normalize."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    split = split if isinstance(split, LMDBSplit) else LMDBSplit(split, need_pairs=False)
    ids = list(image_ids) if image_ids is not None else split.image_ids()
    res = config.image_resolution
    steps = list(getattr(eval_transform(res), "transforms", []))
    need = len(ids) * 3 * res * res
    if [type(s) for s in steps[-2:]] != [ToTensor, Normalize] or need > max_bytes:
        log.info(f"{split.split_dir}: images decoded on each use ({need / 2**30:.1f} GiB of pixels)")
        return None
    ds = ImageDataset(split, Compose([*steps[:-2], _uint8_chw]), ids)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=image_collate)
    pix, got = torch.empty((len(ids), 3, res, res), dtype=torch.uint8), []
    for batch in tqdm(loader, desc="decode", unit="batch", disable=not progress):
        if batch is not None:
            pix[len(got) : len(got) + len(batch[0])] = batch[1]
            got.extend(batch[0].tolist())
    where = {int(i): p for p, i in enumerate(ids)}
    pix = pix if len(got) == len(ids) else pix[: len(got)].clone()
    normalize = steps[-1]
    finish = lambda x: normalize(x.to(torch.float32).div(255))  # noqa: E731  (ToTensor + Normalize, batched)
    return PreparedImages(
        np.asarray(got, np.int64), np.asarray([where[i] for i in got], np.int64), pix, finish, len(ids)
    )

"""A split's images decoded and resized once, kept as uint8 pixels, for encoding with many models.

Scoring many models on one validation split (each soup candidate, each validation of a training
run) decoded and resized every gallery image again for each. :func:`prepare_images` does it once:
the eval transform (:func:`solution.data.datasets.eval_transform`, upstream's) is cut before its
``ToTensor()`` + ``Normalize``; the resized RGB pixels are kept as uint8 (3 x H x W bytes an
image, refused above a bound: ``None`` then, and the caller decodes on each use), and each batch
is finished exactly as those two steps would finish each image (``/255`` in float32, then the same
``Normalize``, elementwise), so :func:`solution.retrieval.encode.encode_images` given them feeds
the model the same tensors in the same batches as it does decoding them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from solution.data.datasets import ImageDataset, eval_transform
from solution.data.lmdb_io import LMDBSplit
from solution.model import ModelConfig

log = logging.getLogger(__name__)

IMAGE_CACHE_BYTES = 8 << 30  # default bound of prepared pixels (MUGE's 29,806 valid images at 224 px: 4.2 GiB)


class _Pixels:
    """The eval transform up to its ``ToTensor``: resized RGB pixels as a uint8 ``[3, H, W]`` tensor."""

    def __init__(self, head: Callable):
        self.head = head

    def __call__(self, im) -> torch.Tensor:
        return torch.from_numpy(np.array(self.head(im), np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _split_transform(resolution: int) -> tuple[Callable, Callable] | None:
    """``(to uint8 pixels, uint8 batch -> model input)``, the eval transform cut before its
    ``ToTensor()`` + ``Normalize``; the second does exactly what those two do (``/255`` in float32,
    then the same ``Normalize``), elementwise, so a batch equals the stack of transformed images."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    t = eval_transform(resolution)
    steps = list(getattr(t, "transforms", []))
    if len(steps) < 2 or type(steps[-2]) is not ToTensor or type(steps[-1]) is not Normalize:
        return None
    normalize = steps[-1]
    return _Pixels(Compose(steps[:-2])), lambda x: normalize(x.to(torch.float32).div(255))


@dataclass
class PreparedImages:
    """Images of a split decoded and resized once (:func:`prepare_images`), kept as uint8 pixels."""

    image_ids: np.ndarray  # int64 [K]: the decodable ones, in the requested order
    positions: np.ndarray  # int64 [K]: each one's index among the requested ids
    pixels: torch.Tensor  # uint8 [K, 3, H, W]
    finish: Callable  # uint8 batch -> the model's input (what ToTensor + Normalize give)
    requested: int  # ids requested (decodable or not)

    def batches(self, batch_size: int):
        """``(ids, images)`` batches as :func:`encode_images`'s loader gives them: the requested ids in
        chunks of ``batch_size``, each without its undecodable images (an empty one is skipped)."""
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
    """Decode and resize a split's images once for every model of ``config``'s resolution (e.g. each
    soup candidate, each validation of a run): uint8 pixels, 3 x H x W bytes an image. None (decode
    on each use) when they would take more than ``max_bytes`` or the eval transform has another form."""
    split = split if isinstance(split, LMDBSplit) else LMDBSplit(split, need_pairs=False)
    ids = list(image_ids) if image_ids is not None else split.image_ids()
    res = config.image_resolution
    need = len(ids) * 3 * res * res
    parts = _split_transform(res)
    if parts is None or need > max_bytes:
        log.info(
            "%s: images decoded on each use (%.1f GiB of pixels, bound %.1f GiB)",
            split.split_dir,
            need / 2**30,
            max_bytes / 2**30,
        )
        return None
    loader = DataLoader(
        _Positions(ImageDataset(split, parts[0], ids)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_positions_collate,
    )
    got, pos, pix = [], [], torch.empty((len(ids), 3, res, res), dtype=torch.uint8)
    for batch in tqdm(loader, desc="decode", unit="batch", disable=not progress):
        for p, image_id, px in batch:
            pix[len(got)] = px
            got.append(image_id)
            pos.append(p)
    pix = pix if len(got) == len(ids) else pix[: len(got)].clone()
    return PreparedImages(np.asarray(got, np.int64), np.asarray(pos, np.int64), pix, parts[1], len(ids))


class _Positions(Dataset):
    """An :class:`ImageDataset` whose items also carry their index (None stays None)."""

    def __init__(self, ds: ImageDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        return None if item is None else (i, *item)


def _positions_collate(batch):
    return [b for b in batch if b is not None]

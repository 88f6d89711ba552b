"""Datasets over cn_clip LMDB splits, image transforms, and the text collate. An image that cannot be decoded is
dropped from its batch with a warning, never a crash mid-training."""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from cn_clip_patch.prompt import tokenize

from .lmdb_io import LMDBSplit

log = logging.getLogger(__name__)

AUGMENTS = ("none", "cnclip", "gentle")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def eval_transform(resolution: int) -> Callable:
    """Upstream's inference transform (resize to a square, bicubic, RGB, CLIP normalisation)."""
    from cn_clip.clip import image_transform

    return image_transform(resolution)


def train_transform(resolution: int, augment: str = "none") -> Callable:
    """``none``: as eval; ``cnclip``: upstream's ``--use-augment`` (timm AutoAugment, scale 0.9-1);
    ``gentle``: RandomResizedCrop(0.8-1) + horizontal flip + mild ColorJitter."""
    from torchvision import transforms as T

    if augment == "none":
        return eval_transform(resolution)
    if augment == "cnclip":
        from timm.data import create_transform

        kw = dict(scale=(0.9, 1.0), color_jitter=None, auto_augment="original", interpolation="bicubic")
        t = create_transform(resolution, is_training=True, mean=MEAN, std=STD, **kw)
        return T.Compose(t.transforms[:-3] + [_to_rgb] + t.transforms[-3:])  # where upstream converts
    if augment == "gentle":
        crop = T.RandomResizedCrop(resolution, scale=(0.8, 1.0), interpolation=T.InterpolationMode.BICUBIC)
        steps = [crop, T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.1)]
        return T.Compose(steps + [_to_rgb, T.ToTensor(), T.Normalize(MEAN, STD)])
    raise ValueError(f"unknown augment {augment!r}; choose from {AUGMENTS}")


def _to_rgb(im: Image.Image) -> Image.Image:
    return im.convert("RGB")


def decode_image(b64: bytes | None) -> Image.Image | None:
    """base64 (standard or url-safe) -> RGB PIL image, or None if it is not a decodable image."""
    if not b64:
        return None
    try:
        im = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
        im.load()
        return im.convert("RGB")
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None


def _image(split: LMDBSplit, image_id: int) -> Image.Image | None:
    im = decode_image(split.image_b64(image_id))
    if im is None:
        log.warning("image %s of %s cannot be decoded; left out", image_id, split.split_dir)
    return im


class PairDataset(Dataset):
    """Training/validation pairs: ``(image tensor, text, text_id, image_id)`` or None if undecodable."""

    def __init__(self, split: LMDBSplit | str, transform: Callable):
        self.split = split if isinstance(split, LMDBSplit) else LMDBSplit(split)
        self.transform = transform

    def __len__(self) -> int:
        return self.split.num_samples

    def __getitem__(self, index: int):
        image_id, text_id, text = self.split.pair(index)
        im = _image(self.split, image_id)
        return None if im is None else (self.transform(im), text, text_id, image_id)


class ImageDataset(Dataset):
    """``(image_id, tensor)`` over the images of a split (all, or the given ids); None if undecodable."""

    def __init__(self, split: LMDBSplit | str, transform: Callable, image_ids: Sequence[int] | None = None):
        self.split = split if isinstance(split, LMDBSplit) else LMDBSplit(split, need_pairs=False)
        self.transform = transform
        self.image_ids = list(image_ids) if image_ids is not None else self.split.image_ids()

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        im = _image(self.split, image_id)
        return None if im is None else (image_id, self.transform(im))


class PairCollate:
    """Batch pairs and tokenise their texts (with the prompt). With ``keep_size`` (training), undecodable samples
    are replaced by the batch's first decodable ones, so every process of a multi-process run gathers batches of one
    size; a batch with none decodable is None (every process skips that step together)."""

    def __init__(self, context_length: int, prompt: str = "", keep_size: bool = False):
        self.context_length, self.prompt, self.keep_size = context_length, prompt, keep_size

    def __call__(self, batch):
        good = [b for b in batch if b is not None]
        if not good:
            return None
        if self.keep_size and len(good) < len(batch):
            good = good + [good[i % len(good)] for i in range(len(batch) - len(good))]
        images, texts, text_ids, image_ids = zip(*good)
        tokens = tokenize(texts, self.context_length, self.prompt)
        return torch.stack(images), tokens, torch.tensor(text_ids), torch.tensor(image_ids)


def image_collate(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    ids, images = zip(*batch)
    return torch.tensor(ids), torch.stack(images)

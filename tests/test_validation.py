"""Validation decodes each image once: the gallery prepared once (uint8 pixels) feeds the model the
same tensors as decoding; the validation loss comes from the retrieval features and equals cn_clip's
contrastive loss over the validation loader's batches; a run's later validations decode nothing."""

import base64
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from train_helpers import COLOURS, _png

from solution.data import datasets
from solution.data.lmdb_io import LMDBSplit, write_split
from solution.retrieval.encode import encode_images, encode_split, prepare_inputs, score_parts, split_queries
from solution.retrieval.pixels import prepare_images
from solution.training.loaders import val_loader
from solution.training.state import RunFiles
from solution.training.step import contrastive_eval
from solution.training.validation import BestTracker, Validation, feature_loss


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Four colours, several images each, one text per colour (twins in batches), one broken image."""
    rng = random.Random(3)
    images, pairs, image_id = [], [], 100
    for c, (name, rgb) in enumerate(COLOURS[:4]):
        for _ in range(4):
            images.append((image_id, _png(rgb, rng, size=20)))
            pairs.append((image_id, 10 + c, name))
            image_id += 1
    images.append((image_id, base64.urlsafe_b64encode(b"not an image")))
    pairs.append((image_id, 10, COLOURS[0][0]))
    rng.shuffle(pairs)
    d = tmp_path_factory.mktemp("val") / "valid"
    write_split(d, images, pairs)
    return LMDBSplit(d)


def test_prepared_gallery_gives_the_decoded_features_bit_for_bit(split, tiny_model, tiny_config):
    plain_ids, plain = encode_images(tiny_model, split, tiny_config, batch_size=5)
    prepared = prepare_images(split, tiny_config, batch_size=3)
    assert prepared.pixels.dtype == torch.uint8 and len(prepared.image_ids) == split.num_images - 1
    ids, feats = encode_images(tiny_model, split, tiny_config, batch_size=5, prepared=prepared)
    assert np.array_equal(ids, plain_ids) and np.array_equal(feats, plain)
    workers = prepare_images(split, tiny_config, batch_size=4, num_workers=2)
    assert np.array_equal(workers.image_ids, prepared.image_ids) and torch.equal(workers.pixels, prepared.pixels)
    flipped = encode_images(tiny_model, split, tiny_config, batch_size=5, flip=True)[1]
    assert np.array_equal(
        encode_images(tiny_model, split, tiny_config, batch_size=5, prepared=prepared, flip=True)[1], flipped
    )
    # above the bound: not prepared (the caller decodes on each use)
    assert prepare_images(split, tiny_config, max_bytes=prepared.pixels.numel() - 1) is None


def test_scores_with_prepared_inputs_are_the_same(split, tiny_model, tiny_config):
    queries = split_queries(split)
    plain = score_parts(tiny_model, split, tiny_config, queries, with_hits=True, batch_size=4)["all"]
    inputs = prepare_inputs(split, tiny_config, queries, batch_size=4)
    got = score_parts(tiny_model, split, tiny_config, queries, with_hits=True, batch_size=4, inputs=inputs)["all"]
    assert np.array_equal(got.pop("hits"), plain.pop("hits")) and got == plain


@pytest.mark.parametrize("same_text", [True, False])
def test_loss_from_features_equals_the_loss_over_the_validation_loader(split, tiny_model, tiny_config, same_text):
    """The same pairs in the same batches: cn_clip's loss of the model on val_loader's batches, to float
    rounding (a feature depends on the other items of its batch only through rounding)."""
    torch.manual_seed(5)
    with torch.no_grad():  # a model that tells the colours apart a little, so the accuracies are not all ties
        tiny_model.logit_scale.fill_(3.0)
    loader = val_loader(
        split,
        resolution=tiny_config.image_resolution,
        context_length=tiny_config.context_length,
        prompt=tiny_config.text_prompt,
        batch_size=6,
        seed=11,
        num_workers=0,
    )
    want = contrastive_eval(tiny_model, loader, device="cpu", same_text=same_text)
    queries = split_queries(split)
    feats = encode_split(tiny_model, split, tiny_config, queries, batch_size=6)
    got = feature_loss(
        feats, queries, split, tiny_model.logit_scale.detach().exp(), batch_size=6, seed=11, same_text=same_text
    )
    assert got.keys() == want.keys()
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert got["val_acc_i2t"] == pytest.approx(want["val_acc_i2t"]) and got["val_acc_t2i"] == pytest.approx(
        want["val_acc_t2i"]
    )


def test_validation_decodes_each_image_once_per_run(split, tiny_model, tiny_config, tmp_path, monkeypatch):
    calls = []
    real = datasets.decode_image
    monkeypatch.setattr(datasets, "decode_image", lambda b64: calls.append(1) or real(b64))
    cfg = SimpleNamespace(
        model_config=tiny_config,
        valid_batch_size=4,
        valid_num_workers=0,
        precision="fp32",
        seed=0,
        same_text_positives=True,
        name="run",
        no_plot=True,
    )
    val = Validation({"valid": split}, cfg, RunFiles(tmp_path / "run"), BestTracker(None))
    d = SimpleNamespace(device=torch.device("cpu"), main=True, world=1)
    rows = [val.score(tiny_model, "valid", split, d, step=s, epoch=0) for s in (1, 2)]
    assert len(calls) == split.num_images  # once, at the first validation; no pair image decoded again
    assert rows[0]["val_loss"] == rows[1]["val_loss"] and rows[0]["mean_recall"] == rows[1]["mean_recall"]
    fresh = score_parts(tiny_model, split, tiny_config, batch_size=4)["all"]
    assert {k: rows[0][k] for k in fresh} == fresh

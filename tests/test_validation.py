"""Validation scores what the offline evaluator scores, its loss is cn_clip's, later validations decode nothing."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from oracles import contrastive_eval
from train_helpers import make_split

from solution.data import datasets
from solution.data.lmdb_io import LMDBSplit
from solution.formats.hits import read_hits
from solution.retrieval.encode import encode_images, encode_split, prepare_images, score_parts, split_queries
from solution.training.state import RunFiles
from solution.training.validation import BestTracker, Validation, feature_loss


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Four colours, four images each, one text per colour (twins in batches), one image broken."""
    d = tmp_path_factory.mktemp("val") / "valid"
    return LMDBSplit(make_split(d, per_colour=4, colours=4, seed=3, text_id_base=10, broken=lambda p: [p[0][0]]))


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
    assert prepare_images(split, tiny_config, max_bytes=prepared.pixels.numel() - 1) is None  # above the bound


@pytest.mark.parametrize("same_text", [True, False])
def test_loss_from_features_equals_the_loss_of_the_model_over_the_batches(split, tiny_model, tiny_config, same_text):
    """The same pairs in the same batches, to float rounding."""
    with torch.no_grad():  # a model that tells the colours apart a little, so the accuracies are not all ties
        tiny_model.logit_scale.fill_(3.0)
    want = contrastive_eval(tiny_model, split, tiny_config, batch_size=6, seed=11, same_text=same_text)
    queries = split_queries(split)
    feats = encode_split(tiny_model, split, tiny_config, queries, batch_size=6)
    scale = tiny_model.logit_scale.detach().exp()
    got = feature_loss(
        feats, queries, split, scale, SimpleNamespace(valid_batch_size=6, seed=11, same_text_positives=same_text)
    )
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("cache_gb", [8.0, 0.0])
def test_validation_scores_as_the_evaluator_and_decodes_once_within_its_cache(
    split, tiny_model, tiny_config, tmp_path, monkeypatch, cache_gb
):
    calls = []
    real = datasets.decode_image
    monkeypatch.setattr(datasets, "decode_image", lambda b64: calls.append(1) or real(b64))
    io = dict(valid_batch_size=4, valid_num_workers=0, valid_image_cache_gb=cache_gb, precision="fp32", seed=0)
    cfg = SimpleNamespace(model_config=tiny_config, same_text_positives=True, name="run", no_plot=True, **io)
    val = Validation({"valid": split}, cfg, RunFiles(tmp_path / "run"), BestTracker(None))
    d = SimpleNamespace(device=torch.device("cpu"), main=True, world=1)
    rows = [val.score(tiny_model, "valid", split, d, step=s, epoch=0) for s in (1, 2)]
    assert len(calls) == split.num_images * (1 if cache_gb else 2)  # with a cache: once, at the first validation
    assert rows[0]["val_loss"] == rows[1]["val_loss"] and rows[0]["mean_recall"] == rows[1]["mean_recall"]
    calls.clear()
    offline = score_parts(tiny_model, split, tiny_config, batch_size=4, with_hits=True)["all"]
    hits = offline.pop("hits")
    assert {k: rows[0][k] for k in offline if k != "text_ids"} == {k: v for k, v in offline.items() if k != "text_ids"}
    assert rows[0]["hits"] == "hits/best.hits.npy"
    assert np.array_equal(read_hits(tmp_path / "run" / "hits" / "best.hits.npy")[1], hits)

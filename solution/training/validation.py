"""Validation during training: each set's recall and cn_clip's contrastive loss from one encoding of its gallery
and queries (decoded images kept up to ``--valid-image-cache-gb``), one metrics line per set; the main set's
record to :class:`BestTracker` (``best.pt``, early stop) and the callback. The main process validates; the
early-stop state, and whether it raised, always reach the others."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from cn_clip_patch.tuning import set_train_mode, unwrap
from solution.data.lmdb_io import LMDBSplit
from solution.formats.hits import write_hits
from solution.formats.run_files import MAIN_SET
from solution.retrieval.encode import (
    Queries,
    SplitFeatures,
    encode_split,
    prepare_inputs,
    score_features,
    split_queries,
)

from .loaders import epoch_order
from .setup import Dist
from .state import RunFiles
from .step import batch_accuracy, clip_loss, twin_mask

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised on the other processes when the main process's validation (or its callback) raised."""


class BestTracker:
    """The best main-set record (by mean recall), the validations since it improved, and whether that count
    reached ``patience`` (early stop; ``None``: never)."""

    def __init__(self, patience: int | None, best: dict | None = None, bad: int = 0):
        self.patience, self.best, self.bad = patience, best, int(bad)
        self.stop = bool(patience and self.bad >= patience)

    def improves(self, record: Mapping) -> bool:
        return self.best is None or record["mean_recall"] > self.best["mean_recall"]

    def update(self, record: Mapping) -> bool:
        """Take a main-set record; True when it is a new best."""
        if self.improves(record):
            self.best, self.bad = dict(record), 0
            return True
        self.bad += 1
        self.stop = bool(self.patience and self.bad >= self.patience)
        return False


@dataclass
class Validation:
    """Scores a run's validation sets; call it with the live model."""

    sets: dict[str, LMDBSplit]
    cfg: object  # the run's TrainConfig
    files: RunFiles
    tracker: BestTracker
    on_validation: Callable[[dict], object] | None = None
    _prepared: dict = field(default_factory=dict, repr=False)  # set name -> (Queries, ScoringInputs)

    def __call__(self, model: nn.Module, d: Dist, *, step: int, epoch: int) -> None:
        err = None
        if d.main:
            try:  # the training RNG left as it was: a resumed run's first validation prepares its inputs again
                with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
                    self._run_main(model, d, step=step, epoch=epoch)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other processes
                err = e
        if d.world > 1:
            t = self.tracker
            box = [None if err is None else f"{type(err).__name__}: {err}", t.stop, t.best, t.bad]
            dist.broadcast_object_list(box, src=0)
            t.stop, t.best, t.bad = box[1:]
            if box[0] is not None and not d.main:
                raise StopRequested(f"stopped: the main process's validation raised ({box[0]})")
        if err is not None:
            raise err

    def _run_main(self, model: nn.Module, d: Dist, *, step: int, epoch: int) -> None:
        cfg, mc = self.cfg, self.cfg.model_config
        rows = [self.score(model, name, split, d, step=step, epoch=epoch) for name, split in self.sets.items()]
        set_train_mode(model, mc.tuning)
        record = next(({k: v for k, v in r.items() if k != "hits"} for r in rows if r["set"] == MAIN_SET), None)
        if record is not None and self.tracker.update(record):
            self.files.save(self.files.best, model, mc, epoch=epoch + 1, step=step, name=cfg.name, metrics=dict(record))
            log.info("new best mean recall %.2f at step %d -> %s", record["mean_recall"], step, self.files.best)
        if not cfg.no_plot:
            self.files.draw_curves(cfg.name)
        if record is not None and self.on_validation is not None:
            self.on_validation(dict(record))

    def _inputs(self, name: str, split: LMDBSplit):
        """A set's queries and scoring inputs, made at its first validation and kept for the later ones."""
        if name not in self._prepared:
            cfg, queries = self.cfg, split_queries(split)
            used = sum(i.images.pixels.numel() for _, i in self._prepared.values() if i.images is not None)
            room = max(0, int(cfg.valid_image_cache_gb * 2**30) - used)
            self._prepared[name] = queries, prepare_inputs(split, cfg.model_config, queries, max_bytes=room, **self._io)
        return self._prepared[name]

    @property
    def _io(self) -> dict:
        return {"batch_size": self.cfg.valid_batch_size, "num_workers": self.cfg.valid_num_workers}

    def score(self, model: nn.Module, name: str, split: LMDBSplit, d: Dist, *, step: int, epoch: int) -> dict:
        """Score one set and log its line (a main-set new best writes its per-query hits first and names them)."""
        cfg, m, t = self.cfg, unwrap(model), time.perf_counter()
        queries, inputs = self._inputs(name, split)
        feats = encode_split(
            m, split, cfg.model_config, queries, inputs=inputs, device=d.device, precision=cfg.precision, **self._io
        )
        parts = {"all": queries.text_ids}
        rec = score_features(feats, split, queries, parts, device=d.device, with_hits=name == MAIN_SET)["all"]
        text_ids, hits = rec.pop("text_ids", None), rec.pop("hits", None)
        scale = m.logit_scale.detach().exp()
        rec.update(
            feature_loss(
                feats, queries, split, scale, cfg.valid_batch_size, cfg.seed, cfg.same_text_positives, d.device
            )
        )
        row = {"step": step, "epoch": epoch + 1, "kind": "valid", "set": name, **{k: float(v) for k, v in rec.items()}}
        row.update(logit_scale=float(scale), seconds=time.perf_counter() - t)
        if hits is not None and self.tracker.improves(row):
            write_hits(self.files.best_hits, text_ids, hits)
            row["hits"] = self.files.best_hits.relative_to(self.files.run_dir).as_posix()
        self.files.log_row(row)
        log.info(
            "valid %s @ step %d: mean recall %.2f, val loss %.4f",
            name,
            step,
            row["mean_recall"],
            row.get("val_loss", float("nan")),
        )
        return row


@torch.no_grad()
def feature_loss(
    feats: SplitFeatures, queries: Queries, split: LMDBSplit, scale, batch_size, seed, same_text, device="cpu"
):
    """cn_clip's validation loss and in-batch accuracies from features already computed: the split's pairs in a
    fixed shuffled order (``seed``) and batches of ``batch_size``, each pair's image feature by image id and text
    feature by text id; a pair whose image did not decode leaves its batch."""
    order = epoch_order(split.num_samples, 1, seed, 0).tolist()
    img_row = {int(i): r for r, i in enumerate(feats.image_ids.tolist())}
    txt_row = {int(t): r for r, t in enumerate(queries.text_ids)}
    img, txt = torch.from_numpy(feats.image_feats).to(device), torch.from_numpy(feats.text_feats).to(device)
    total = acc_i = acc_t = 0.0
    n = 0
    for lo in range(0, len(order), batch_size):
        pairs = [
            (img_row[i], txt_row[t], t) for i, t, _ in map(split.pair, order[lo : lo + batch_size]) if i in img_row
        ]
        if pairs:
            ri, rt, tids = (torch.tensor(c, device=device) for c in zip(*pairs))
            twins = twin_mask(tids, same_text)
            loss, logits = clip_loss(img[ri], txt[rt], scale.float().to(device), twins)
            i2t, t2i = batch_accuracy(logits, twins)
            b = len(pairs)
            total, acc_i, acc_t, n = total + float(loss) * b, acc_i + i2t * b, acc_t + t2i * b, n + b
    return {"val_loss": total / n, "val_acc_i2t": 100.0 * acc_i / n, "val_acc_t2i": 100.0 * acc_t / n} if n else {}

"""Validation on the main process: each set's recall and contrastive loss from one encoding, a metrics line each;
the main set's record to :class:`BestTracker` (``best.pt``, early stop on every process) and the callback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from cn_clip_patch.tuning import set_train_mode, unwrap
from solution.data.lmdb_io import LMDBSplit
from solution.formats.hits import write_hits
from solution.formats.run_files import MAIN_SET
from solution.retrieval.encode import encode_split, prepare_inputs, score_features, split_queries

from .loaders import epoch_order
from .setup import Dist, on_main
from .state import RunFiles
from .step import batch_accuracy, clip_loss, twin_mask

log = logging.getLogger(__name__)


class BestTracker:
    """The best main-set record (mean recall), the validations since, whether they reached ``patience``."""

    def __init__(self, patience: int | None, best: dict | None = None, bad: int = 0):
        self.patience, self.best, self.bad = patience, best, int(bad)

    @property
    def stop(self) -> bool:
        return bool(self.patience and self.bad >= self.patience)

    def improves(self, record: Mapping) -> bool:
        return self.best is None or record["mean_recall"] > self.best["mean_recall"]

    def update(self, record: Mapping) -> bool:
        """Take a main-set record; True when it is a new best."""
        new = self.improves(record)
        self.best, self.bad = (dict(record), 0) if new else (self.best, self.bad + 1)
        return new


@dataclass
class Validation:
    """Scores a run's validation sets (``cfg``: its TrainConfig)."""

    sets: dict[str, LMDBSplit]
    cfg: object
    files: RunFiles
    tracker: BestTracker
    on_validation: Callable[[dict], object] | None = None
    _prepared: dict = field(default_factory=dict, repr=False)  # set name -> (Queries, ScoringInputs)

    def __call__(self, model: nn.Module, d: Dist, *, step: int, epoch: int) -> None:
        def run() -> tuple:
            with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):  # training's RNG kept
                self._validate(model, d, step=step, epoch=epoch)
            return t.best, t.bad

        t = self.tracker
        t.best, t.bad = on_main(d, run)

    def _validate(self, model: nn.Module, d: Dist, *, step: int, epoch: int) -> None:
        cfg, mc = self.cfg, self.cfg.model_config
        rows = [self.score(model, name, split, d, step=step, epoch=epoch) for name, split in self.sets.items()]
        set_train_mode(model, mc.tuning)
        record = next(({k: v for k, v in r.items() if k != "hits"} for r in rows if r["set"] == MAIN_SET), None)
        if record is not None and self.tracker.update(record):
            self.files.save(self.files.best, model, mc, epoch=epoch + 1, step=step, metrics=dict(record))
            log.info("new best mean recall %.2f at step %d -> %s", record["mean_recall"], step, self.files.best)
        if not cfg.no_plot:
            self.files.draw_curves(cfg.name)
        if record is not None and self.on_validation is not None:
            self.on_validation(dict(record))

    def score(self, model: nn.Module, name: str, split: LMDBSplit, d: Dist, *, step: int, epoch: int) -> dict:
        """Score one set and log its line (a main-set new best writes its per-query hits first and names them)."""
        cfg, mc, m, t, main = self.cfg, self.cfg.model_config, unwrap(model), time.perf_counter(), name == MAIN_SET
        io = {"batch_size": cfg.valid_batch_size, "num_workers": cfg.valid_num_workers}
        if name not in self._prepared:  # made once: the gallery decoded within the cache's room, texts tokenised
            used = sum(i.images.pixels.numel() for _, i in self._prepared.values() if i.images is not None)
            room, queries = max(0, int(cfg.valid_image_cache_gb * 2**30) - used), split_queries(split)
            self._prepared[name] = queries, prepare_inputs(split, mc, queries, max_bytes=room, **io)
        queries, inputs = self._prepared[name]
        feats = encode_split(m, split, mc, queries, inputs=inputs, device=d.device, precision=cfg.precision, **io)
        rec = score_features(feats, split, queries, {"all": queries.text_ids}, device=d.device, with_hits=main)["all"]
        text_ids, hits = rec.pop("text_ids", None), rec.pop("hits", None)
        scale = m.logit_scale.detach().exp()
        rec.update(feature_loss(feats, queries, split, scale, cfg, d.device))
        row = {"step": step, "epoch": epoch + 1, "kind": "valid", "set": name, **{k: float(v) for k, v in rec.items()}}
        row.update(logit_scale=float(scale), seconds=time.perf_counter() - t)
        if main and self.tracker.improves(row):
            write_hits(self.files.best_hits, text_ids, hits)
            row["hits"] = self.files.best_hits.relative_to(self.files.run_dir).as_posix()
        self.files.log_row(row)
        log.info("valid %s @ step %d: mean recall %.2f, val loss %.4f", name, step, row["mean_recall"], row["val_loss"])
        return row


@torch.no_grad()
def feature_loss(feats, queries, split: LMDBSplit, scale, cfg, device="cpu") -> dict:
    """cn_clip's validation loss and accuracies from the split's features: its pairs in a seeded order, in batches,
    by image and text id (pairs whose image did not decode left out)."""
    order = epoch_order(split.num_samples, 1, cfg.seed, 0).tolist()
    img_row = {int(i): r for r, i in enumerate(feats.image_ids.tolist())}
    txt_row = {int(t): r for r, t in enumerate(queries.text_ids)}
    img, txt = torch.from_numpy(feats.image_feats).to(device), torch.from_numpy(feats.text_feats).to(device)
    total = acc_i = acc_t = n = 0
    for lo in range(0, len(order), cfg.valid_batch_size):
        batch = map(split.pair, order[lo : lo + cfg.valid_batch_size])
        pairs = [(img_row[i], txt_row[t], t) for i, t, _ in batch if i in img_row]
        if pairs:
            ri, rt, tids = (torch.tensor(c, device=device) for c in zip(*pairs))
            twins = twin_mask(tids, cfg.same_text_positives)
            loss, logits = clip_loss(img[ri], txt[rt], scale.float().to(device), twins)
            i2t, t2i = batch_accuracy(logits, twins)
            b = len(pairs)
            total, acc_i, acc_t, n = total + float(loss) * b, acc_i + i2t * b, acc_t + t2i * b, n + b
    return {"val_loss": total / n, "val_acc_i2t": 100.0 * acc_i / n, "val_acc_t2i": 100.0 * acc_t / n}

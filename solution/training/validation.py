"""Validation during training: every validation set scored and logged, the best kept, early stop.

The main process scores each set (``valid``, the main one, then each ``--extra-val-data`` set):
text->image R@1/5/10 and mean recall through :func:`solution.retrieval.encode.evaluate_split`
(the one-part form of ``score_parts``, which the soup scores with), plus the contrastive
validation loss and in-batch accuracy (:func:`.step.contrastive_eval`); one ``metrics.jsonl``
line per set. The main set is scored with its per-query hits (from the same rankings); when its
score is a new best they go to ``hits/best.hits.npy`` (:mod:`solution.formats.hits`, written before
the row) and that row names them (``"hits": "hits/best.hits.npy"``). The main set's record goes
to :class:`BestTracker` (a new best writes ``checkpoints/best.pt``; ``--early-stop-patience``
validations without improvement stop the run) and to the ``on_validation`` callback. The other
processes wait; the early-stop state (stop flag, best record, count) and whether the validation or
its callback raised are then always broadcast, so every process stops together and none waits for
an answer that never comes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch.distributed as dist
from torch import nn

from cn_clip_patch.tuning import set_train_mode

from solution.data.lmdb_io import LMDBSplit
from solution.formats.hits import write_hits
from solution.formats.runs import MAIN_SET
from solution.model import ModelConfig
from solution.retrieval.encode import evaluate_split

from .loaders import val_loader
from .run_config import TrainConfig
from .setup import Dist
from .state import RunFiles
from .step import contrastive_eval, unwrap

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised on the other processes when the main process's validation (or its callback) raised."""


class BestTracker:
    """The best main-set record (by mean recall), the validations since it last improved, and
    whether that count reached ``patience`` (early stop; ``None``/0: never)."""

    def __init__(self, patience: int | None, best: dict | None = None, bad: int = 0):
        self.patience, self.best, self.bad = patience, best, int(bad)
        self.stop = self._exhausted()

    def _exhausted(self) -> bool:
        return bool(self.patience and self.bad >= self.patience)

    def improves(self, record: Mapping) -> bool:
        """Whether ``record`` would be a new best (what :meth:`update` would answer), changing nothing."""
        return self.best is None or record["mean_recall"] > self.best["mean_recall"]

    def update(self, record: Mapping) -> bool:
        """Take a main-set record; True when it is a new best."""
        if self.improves(record):
            self.best, self.bad = dict(record), 0
            return True
        self.bad += 1
        self.stop = self.stop or self._exhausted()
        return False


@dataclass
class Validation:
    """Scores a run's validation sets (see the module docstring); call it with the live model."""

    sets: dict[str, LMDBSplit]
    cfg: TrainConfig
    files: RunFiles
    tracker: BestTracker
    on_validation: Callable[[dict], object] | None = None

    @property
    def model_config(self) -> ModelConfig:
        return self.cfg.model_config

    def __call__(self, model: nn.Module, d: Dist, *, step: int, epoch: int) -> None:
        if not self.sets:
            return
        err = None
        if d.main:
            try:
                self._run_main(model, d, step=step, epoch=epoch)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other processes
                err = e
        self._share(d, err)
        if err is not None:
            raise err

    def _run_main(self, model: nn.Module, d: Dist, *, step: int, epoch: int) -> None:
        rows = [self.score(model, name, split, d, step=step, epoch=epoch) for name, split in self.sets.items()]
        set_train_mode(model, self.model_config.tuning)
        record = next(({k: v for k, v in r.items() if k != "hits"} for r in rows if r["set"] == MAIN_SET), None)
        if record is not None and self.tracker.update(record):
            self.files.save(self.files.best, model, self.model_config, epoch=epoch + 1, step=step,
                            name=self.cfg.name, metrics=dict(record))
            log.info("new best mean recall %.2f at step %d -> %s", record["mean_recall"], step, self.files.best)
        if not self.cfg.no_plot:
            self.files.draw_curves(self.cfg.name)
        if record is not None and self.on_validation is not None:
            self.on_validation(dict(record))

    def score(self, model: nn.Module, name: str, split: LMDBSplit, d: Dist, *, step: int, epoch: int) -> dict:
        """Score one set, append its ``metrics.jsonl`` line and return it (the main set's new best
        writes its per-query hits first and names them in the line)."""
        cfg, m, t = self.cfg, unwrap(model), time.perf_counter()
        rec = evaluate_split(m, split, self.model_config, device=d.device, batch_size=cfg.valid_batch_size,
                             num_workers=cfg.valid_num_workers, precision=cfg.precision, with_hits=name == MAIN_SET)
        text_ids, hits = rec.pop("text_ids", None), rec.pop("hits", None)
        loader = val_loader(split, resolution=self.model_config.image_resolution,
                            context_length=self.model_config.context_length, prompt=self.model_config.text_prompt,
                            batch_size=cfg.valid_batch_size, seed=cfg.seed, num_workers=cfg.valid_num_workers)
        rec.update(contrastive_eval(m, loader, device=d.device, precision=cfg.precision,
                                    same_text=cfg.same_text_positives))
        row = {"step": step, "epoch": epoch + 1, "kind": "valid", "set": name, **{k: float(v) for k, v in rec.items()},
               "logit_scale": float(m.logit_scale.detach().exp()), "seconds": time.perf_counter() - t}
        if hits is not None and self.tracker.improves(row):
            write_hits(self.files.best_hits, text_ids, hits)
            row["hits"] = self.files.best_hits.relative_to(self.files.run_dir).as_posix()
        self.files.log_row(row)
        log.info("valid %s @ step %d: R@1 %.2f R@5 %.2f R@10 %.2f mean %.2f | val loss %.4f", name, step, row["r1"],
                 row["r5"], row["r10"], row["mean_recall"], row.get("val_loss", float("nan")))
        return row

    def _share(self, d: Dist, err: BaseException | None) -> None:
        """Tell every process the early-stop state (stop flag, best record, count) and whether the main
        process's validation or callback raised; always sent, so no process waits for it in vain."""
        if d.world == 1:
            return
        t = self.tracker
        box = [None if err is None else f"{type(err).__name__}: {err}", t.stop, t.best, t.bad]
        dist.broadcast_object_list(box, src=0)
        t.stop, t.best, t.bad = box[1], box[2], box[3]
        if box[0] is not None and not d.main:
            raise StopRequested(f"stopped: the main process's validation raised ({box[0]})")

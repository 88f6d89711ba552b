"""Validation during training: every validation set scored and logged, the best kept, early stop.

The main process scores each set (``valid``, the main one, then each ``--extra-val-data`` set):
text->image R@1/5/10 and mean recall through :func:`solution.retrieval.encode.evaluate_split`
(the one-part form of ``score_parts``, which the soup scores with), plus the contrastive
validation loss and in-batch accuracy: cn_clip's (as :func:`.step.contrastive_eval` computes them
over :func:`.loaders.val_loader`'s batches), here from the very features the recall was computed
from (:func:`feature_loss`: the same pairs in the same batches, each pair's image feature by image
id and text feature by text id), so a validation decodes and encodes each image and text once.
The gallery's decoded pixels and the tokenised queries are kept for the run's later validations
(:func:`solution.retrieval.encode.prepare_inputs`; pixels up to :data:`CACHE_BYTES` over all
sets, beyond that a set's images are decoded at each validation); one ``metrics.jsonl`` line per
set. The main set is scored with its per-query hits (from the same rankings); when its
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from cn_clip_patch.tuning import set_train_mode, unwrap
from solution.data.lmdb_io import LMDBSplit
from solution.formats.hits import write_hits
from solution.formats.run_files import MAIN_SET
from solution.model import ModelConfig
from solution.retrieval.encode import (
    Queries,
    ScoringInputs,
    SplitFeatures,
    encode_split,
    prepare_inputs,
    score_features,
    split_queries,
)
from solution.retrieval.pixels import IMAGE_CACHE_BYTES

from .loaders import epoch_order
from .run_config import TrainConfig
from .setup import Dist
from .state import RunFiles
from .step import batch_accuracy, clip_loss, twin_mask

log = logging.getLogger(__name__)

CACHE_BYTES = IMAGE_CACHE_BYTES  # decoded validation pixels kept across a run's validations, all sets together


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
    _prepared: dict = field(default_factory=dict, repr=False)  # set name -> (Queries, ScoringInputs)

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
            self.files.save(
                self.files.best,
                model,
                self.model_config,
                epoch=epoch + 1,
                step=step,
                name=self.cfg.name,
                metrics=dict(record),
            )
            log.info("new best mean recall %.2f at step %d -> %s", record["mean_recall"], step, self.files.best)
        if not self.cfg.no_plot:
            self.files.draw_curves(self.cfg.name)
        if record is not None and self.on_validation is not None:
            self.on_validation(dict(record))

    def _inputs(self, name: str, split: LMDBSplit) -> tuple[Queries, ScoringInputs]:
        """A set's queries, its tokenised texts and (within the bound) decoded gallery, made at its first
        validation and kept for the run's later ones."""
        if name not in self._prepared:
            queries, cfg = split_queries(split), self.cfg
            used = sum(i.images.pixels.numel() for _, i in self._prepared.values() if i.images is not None)
            self._prepared[name] = (
                queries,
                prepare_inputs(
                    split,
                    self.model_config,
                    queries,
                    batch_size=cfg.valid_batch_size,
                    num_workers=cfg.valid_num_workers,
                    max_bytes=max(0, CACHE_BYTES - used),
                ),
            )
        return self._prepared[name]

    def score(self, model: nn.Module, name: str, split: LMDBSplit, d: Dist, *, step: int, epoch: int) -> dict:
        """Score one set, append its ``metrics.jsonl`` line and return it (the main set's new best
        writes its per-query hits first and names them in the line)."""
        cfg, m, t = self.cfg, unwrap(model), time.perf_counter()
        queries, inputs = self._inputs(name, split)
        feats = encode_split(
            m,
            split,
            self.model_config,
            queries,
            inputs=inputs,
            device=d.device,
            batch_size=cfg.valid_batch_size,
            num_workers=cfg.valid_num_workers,
            precision=cfg.precision,
        )
        rec = score_features(
            feats, split, queries, {"all": queries.text_ids}, device=d.device, with_hits=name == MAIN_SET
        )["all"]
        text_ids, hits = rec.pop("text_ids", None), rec.pop("hits", None)
        rec.update(
            feature_loss(
                feats,
                queries,
                split,
                m.logit_scale.detach().exp(),
                batch_size=cfg.valid_batch_size,
                seed=cfg.seed,
                same_text=cfg.same_text_positives,
                device=d.device,
            )
        )
        row = {
            "step": step,
            "epoch": epoch + 1,
            "kind": "valid",
            "set": name,
            **{k: float(v) for k, v in rec.items()},
            "logit_scale": float(m.logit_scale.detach().exp()),
            "seconds": time.perf_counter() - t,
        }
        if hits is not None and self.tracker.improves(row):
            write_hits(self.files.best_hits, text_ids, hits)
            row["hits"] = self.files.best_hits.relative_to(self.files.run_dir).as_posix()
        self.files.log_row(row)
        log.info(
            "valid %s @ step %d: R@1 %.2f R@5 %.2f R@10 %.2f mean %.2f | val loss %.4f",
            name,
            step,
            row["r1"],
            row["r5"],
            row["r10"],
            row["mean_recall"],
            row.get("val_loss", float("nan")),
        )
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


@torch.no_grad()
def feature_loss(
    feats: SplitFeatures,
    queries: Queries,
    split: LMDBSplit,
    logit_scale: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    same_text: bool = True,
    device="cpu",
) -> dict:
    """cn_clip's validation loss and in-batch accuracies (:func:`.step.contrastive_eval`'s arithmetic)
    from features already computed: the split's pairs in :func:`.loaders.val_loader`'s order and
    batches (``batch_size``, ``seed``), each pair's image feature by its image id and text feature by
    its text id; a pair whose image did not decode leaves its batch, as that loader drops it."""
    order = epoch_order(split.num_samples, 1, seed, 0).tolist()
    img_row = {int(i): r for r, i in enumerate(feats.image_ids.tolist())}
    txt_row = {int(t): r for r, t in enumerate(queries.text_ids)}
    img = torch.from_numpy(feats.image_feats).to(device)
    txt = torch.from_numpy(feats.text_feats).to(device)
    scale = logit_scale.float().to(device)
    total = acc_i = acc_t = 0.0
    n = 0
    for lo in range(0, len(order), batch_size):
        pairs = [split.pair(i) for i in order[lo : lo + batch_size]]
        pairs = [(img_row[i], txt_row[t], t) for i, t, _ in pairs if i in img_row]
        if not pairs:
            continue
        ri, rt, tids = (torch.tensor(c, device=device) for c in zip(*pairs))
        twins = twin_mask(tids, same_text)
        loss, logits = clip_loss(img[ri], txt[rt], scale, twins)
        i2t, t2i = batch_accuracy(logits, twins)
        b = len(pairs)
        total, acc_i, acc_t, n = total + float(loss) * b, acc_i + i2t * b, acc_t + t2i * b, n + b
    if n == 0:
        return {}
    return {"val_loss": total / n, "val_acc_i2t": 100.0 * acc_i / n, "val_acc_t2i": 100.0 * acc_t / n}

"""Fine-tune Chinese-CLIP: full, LoRA or frozen towers, prompts, recall validation, exact resume.

``bash Chinese-CLIP/train_clip.sh [flags]`` = ``python -m solution.train [flags]``; cn_clip's own
training flags keep their names, meanings and defaults (see :mod:`solution.train_args`).
Multi-process: ``torchrun --nproc_per_node N -m solution.train ...`` (NCCL on GPU, gloo on CPU);
``--batch-size`` is per process. Rank 0 writes every file and runs validation (the same
``solution.features.evaluate_split`` the offline evaluator uses) while the other ranks wait.

Outputs under ``{logs}/{name}/`` (see :mod:`solution.train_state`): checkpoints, ``params.json``,
``metrics.jsonl`` (``{"step", "epoch", "kind": "train"|"valid", ...}``), ``curves.png``. The main
process locks the run folder for the whole run, and a re-run resumes only under the flags the run
was trained with (see :mod:`solution.train_guard`); it first writes the checkpoints a killed run
still owed (see :mod:`solution.train_state`).

``main(argv, on_validation=None)`` returns ``{"run_dir", "best", "best_checkpoint",
"last_checkpoint", "params"}``. ``on_validation(record)`` is called after each validation of the
main set with its metrics record; an exception it raises (e.g. ``optuna.TrialPruned``) propagates
after the run directory is consistent (metrics, best.pt and the last epoch_latest.pt on disk).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch.distributed as dist
from tqdm import tqdm

from cn_clip_patch.tuning import set_train_mode

from solution.common import SolutionError, run_cli, setup_logging, write_json
from solution.retrieval.encode import evaluate_split
from .step import StepConfig, Stepper, contrastive_eval, unwrap
from solution.plots import plot_run
from .config import parse_args
from .loaders import num_micro_batches, open_split, train_loader, val_loader
from .guard import agree, check_resume_flags, claim_run_folder
from .setup import Dist, build, find_start, init_distributed, load_optimizer_state, make_optimizer, make_scaler, \
    make_scheduler, model_config, wrap
from .state import RunFiles, rng_state, set_rng_state, weights_for_checkpoint

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised on non-main ranks when the main rank's validation callback raised."""


def main(argv: Sequence[str] | None = None, on_validation: Callable[[dict], object] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    d = init_distributed(args.device)
    try:
        return Trainer(args, d, on_validation).run()
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(self, args, d: Dist, on_validation):
        self.args, self.d, self.on_validation = args, d, on_validation
        self.files = RunFiles(Path(args.logs) / args.name)
        self.best: dict | None = None
        self.bad_validations = 0
        self.stop_early = False
        self.closed, self.owed = True, []  # end-of-epoch work done; checkpoints the resumed state still owes

    # ------------------------------------------------------------ setup

    def _open_data(self) -> None:
        """Open the splits and size the epoch (read-only: before the run folder is claimed)."""
        a, d = self.args, self.d
        self.train_split = open_split(a.train_data, "--train-data")
        self.val_sets = {}
        if a.val_data:
            self.val_sets["valid"] = open_split(a.val_data, "--val-data")
        for name, path in a.extra_val.items():
            self.val_sets[name] = open_split(path, f"--extra-val-data {name}")
        self.global_batch = a.batch_size * d.world
        n = self.train_split.num_samples
        if self.global_batch > n:
            raise SolutionError(f"batch size {a.batch_size} x {d.world} process(es) = {self.global_batch} is larger than "
                                f"the {n} training pairs in {a.train_data}")
        self.micro_per_epoch = num_micro_batches(n, self.global_batch)
        self.steps_per_epoch = self.micro_per_epoch // a.accum_freq
        if self.steps_per_epoch == 0:
            raise SolutionError(f"--accum-freq {a.accum_freq} needs {a.accum_freq} batches per step but an epoch has "
                                f"only {self.micro_per_epoch}")
        if a.max_steps is not None:
            a.max_epochs = -(-a.max_steps // self.steps_per_epoch)
        else:
            a.max_steps = self.steps_per_epoch * a.max_epochs

    def _setup(self) -> None:
        a, d = self.args, self.d
        self.start = find_start(a, self.files.latest)
        self.config = model_config(a, self.start)
        self.params = self._params()
        if self.start.own:
            step = int(self.start.ckpt.get("step", 0))
            agree(d, lambda: check_resume_flags(self.files.params, self.params, step, a.allow_changed_flags))
        model = build(a, self.config, self.start)
        self.optimizer = make_optimizer(model, a)
        self.model = wrap(model, d, a)
        self.scheduler = make_scheduler(self.optimizer, a, a.max_steps)
        self.scaler = make_scaler(a, d.device)
        self.stepper = Stepper(self.model, self.optimizer, self.scaler,
                               StepConfig(d.device, a.precision, a.accum_freq, a.mask_ratio, a.same_text_positives,
                                          not a.skip_aggregate))
        self.epoch, self.micro, self.step = 0, 0, 0
        self._restore()

    def _restore(self) -> None:
        a, ckpt = self.args, self.start.ckpt
        if ckpt is None:
            return
        state = ckpt.get("train_state") or {}
        if self.start.own:
            pos = state.get("position") or {"epoch": int(ckpt.get("epoch", 0)), "micro": 0}
            self.epoch, self.micro, self.step = int(pos["epoch"]), int(pos["micro"]), int(ckpt.get("step", 0))
            self._load_optimizer(ckpt)
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.best = state.get("best")
            self.bad_validations = int(state.get("bad_validations", 0))
            self.stop_early = bool(a.early_stop_patience and self.bad_validations >= a.early_stop_patience)
            self.owed = list(state.get("owed") or [])
            self.closed = state.get("closed")
            if self.closed is None:  # written before "closed" was recorded: a done final save wrote epoch_N.pt
                self.closed = self.micro == 0 or (self.micro < self.steps_per_epoch * a.accum_freq
                                                  and self.files.epoch_path(self.epoch + 1).is_file())
            rngs = state.get("rng") or []
            if len(rngs) == self.d.world:
                set_rng_state(rngs[self.d.rank])
            elif rngs:
                log.warning("RNG state saved by %d processes, now %d: not restored", len(rngs), self.d.world)
            log.info("resumed at epoch %d, micro-batch %d, step %d", self.epoch + 1, self.micro, self.step)
            return
        if not a.reset_data_offset:
            pos = state.get("position")
            if pos:
                self.epoch, self.micro = int(pos["epoch"]), int(pos["micro"])
            else:
                self.epoch = int(ckpt.get("epoch", 0))
            self.step = int(ckpt.get("step", 0))
            if self.step >= a.max_steps:
                log.warning("%s is at step %d, beyond --max-steps/--max-epochs (%d): nothing to train "
                            "(pass --reset-data-offset to fine-tune from it)", self.start.source, self.step, a.max_steps)
        if not a.reset_optimizer:
            self._load_optimizer(ckpt)

    def _load_optimizer(self, ckpt: dict) -> None:
        opt = ckpt.get("optimizer")
        if not opt:
            if not self.start.own:
                log.info("%s has no optimizer state: starting a fresh optimizer", self.start.source)
            return
        e = load_optimizer_state(self.optimizer, opt)
        if e is not None:
            if self.start.own:
                raise SolutionError(f"{self.start.source}: optimizer state does not match this command's model/tuning "
                                    f"({e}); use another --name or --no-auto-resume")
            log.warning("%s: optimizer state does not fit this model/tuning (%s); starting a fresh optimizer "
                        "(as --reset-optimizer)", self.start.source, e)

    def _params(self) -> dict:
        a = self.args
        params = {k: v for k, v in vars(a).items() if k != "extra_val"}
        params.update({"model_config": self.config.to_dict(), "world_size": self.d.world,
                       "global_batch_size": self.global_batch * a.accum_freq, "steps_per_epoch": self.steps_per_epoch,
                       "resumed_from": self.start.source, "train_pairs": self.train_split.num_samples})
        return params

    def _validated_at(self, step: int) -> bool:
        """Whether the training loop validated at ``step`` (it does so before that step's checkpoint)."""
        return bool(self.val_sets and self.args.valid_step_interval and step % self.args.valid_step_interval == 0)

    # ------------------------------------------------------------ run

    def run(self) -> dict:
        self._open_data()
        with contextlib.ExitStack() as stack:
            agree(self.d, lambda: claim_run_folder(stack, self.files.run_dir, self.args.logs))
            return self._run()

    def _run(self) -> dict:
        self._setup()
        if self.d.main:
            write_json(self.files.params, self.params)
            if self.start.own:
                self.files.pay_owed(self.owed, self.model, self.config, epoch=int(self.start.ckpt.get("epoch", 0)),
                                    step=self.step, name=self.args.name, best=self.best)
                # a validation of the resumed step that is to be redone (the kill came before its
                # checkpoint) must not leave its first rows behind
                self.files.truncate_metrics(self.step, not self.closed and not self._validated_at(self.step))
            elif self.files.metrics.exists():
                self.files.metrics.unlink()
        set_train_mode(self.model, self.config.tuning)
        a = self.args
        total = a.max_steps
        bar = tqdm(total=total, initial=min(self.step, total), desc=a.name, unit="step",
                   disable=a.no_progress or not self.d.main, dynamic_ncols=True)
        try:
            self._train(bar)
        finally:
            bar.close()
        if self.d.main and not a.no_plot:
            self._plot()
        last = self.files.latest if self.files.latest.is_file() else None
        best_ckpt = self.files.best if (self.best is not None and self.files.best.is_file()) else None
        return {"run_dir": str(self.files.run_dir), "best": self.best, "best_checkpoint": str(best_ckpt) if best_ckpt else None,
                "last_checkpoint": str(last) if last else None, "params": self.params}

    def _train(self, bar) -> None:
        a = self.args
        stop = self.steps_per_epoch * a.accum_freq
        while self.epoch < a.max_epochs:
            epoch = self.epoch
            if (self.step >= a.max_steps or self.stop_early) and (self.micro == 0 or self.closed):
                break  # done; else resumed at its last step before the final validation/saves were recorded
            validated_at = self.step if self._validated_at(self.step) else -1
            if self.micro < stop and self.step < a.max_steps and not self.stop_early:
                validated_at = self._train_epoch(epoch, stop, bar, validated_at)
            epoch_done = self.micro >= stop
            final = self.step >= a.max_steps or self.stop_early
            if (self.val_sets and a.valid_epoch_interval and validated_at != self.step
                    and (final or (epoch + 1) % a.valid_epoch_interval == 0)):
                self._validate(epoch)
            due = final or (a.save_epoch_frequency > 0 and (epoch + 1) % a.save_epoch_frequency == 0)
            self._save(self.files.epoch_path(epoch + 1) if due else None, epoch, advance=epoch_done, closed=True)
            if epoch_done:
                self.epoch, self.micro = epoch + 1, 0
        if self.stop_early:
            log.info("early stop: mean recall did not improve for %d validations (best %.2f at step %d)",
                     self.bad_validations, self.best["mean_recall"], self.best["step"])

    def _train_epoch(self, epoch: int, stop: int, bar, validated_at: int) -> int:
        """Train epoch ``epoch`` from the current micro-batch to ``stop`` (or the last step, or an early
        stop); returns the step of the last validation."""
        a = self.args
        loader = train_loader(self.train_split, resolution=self.config.image_resolution, augment=a.augment,
                              context_length=self.config.context_length, prompt=self.config.text_prompt,
                              batch_size=a.batch_size, rank=self.d.rank, world=self.d.world, seed=a.seed,
                              epoch=epoch, start=self.micro, stop=stop, num_workers=a.num_workers)
        it = iter(loader)
        t_data = time.perf_counter()
        while self.micro < stop and self.step < a.max_steps:
            batches = [next(it) for _ in range(a.accum_freq)]
            self.micro += a.accum_freq
            if any(b is None for b in batches):
                log.warning("step %d: a batch had no decodable image; skipped", self.step + 1)
                continue
            t0 = time.perf_counter()
            lr = self.scheduler(self.step)
            out = self.stepper(batches)
            self.step += 1
            self.closed = False
            dt = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", scale=f"{out['logit_scale']:.2f}", lr=f"{lr:.2e}", refresh=False)
            if self.d.main and (self.step % a.log_interval == 0 or self.step == a.max_steps):
                row = {"step": self.step, "epoch": epoch + 1, "kind": "train", "loss": out["loss"], "lr": lr,
                       "logit_scale": out["logit_scale"], "pairs_per_s": out["pairs"] / dt,
                       "data_time": t0 - t_data, "batch_time": dt, "time": time.time()}
                if a.report_training_batch_acc:
                    row.update(acc_i2t=100 * out["acc_i2t"], acc_t2i=100 * out["acc_t2i"])
                self.files.log_row(row)
                log.debug("step %d loss %.4f logit_scale %.2f lr %.3g", self.step, out["loss"], out["logit_scale"], lr)
            if a.valid_step_interval and self.step % a.valid_step_interval == 0:
                self._validate(epoch)
                validated_at = self.step
            if a.save_step_frequency > 0 and self.step % a.save_step_frequency == 0:
                self._save(self.files.epoch_path(epoch + 1, self.step), epoch)
            if self.stop_early:
                break
            t_data = time.perf_counter()
        return validated_at

    # ------------------------------------------------------------ checkpoints

    def _save(self, path: Path | None, epoch: int, advance: bool = False, closed: bool = False) -> None:
        """Write ``epoch_latest.pt``, then ``path`` (if any) from the same weights; ``advance`` = this epoch
        is complete, ``closed`` = its end-of-epoch/final work is done."""
        rngs = self._gather_rng()
        self.closed = closed
        if not self.d.main:
            return
        weights = weights_for_checkpoint(self.model, self.config)
        name = self.args.name
        pos = {"epoch": epoch + 1, "micro": 0} if advance else {"epoch": epoch, "micro": self.micro}
        t = time.perf_counter()
        m = unwrap(self.model)
        state = {"position": pos, "rng": rngs, "best": self.best, "bad_validations": self.bad_validations,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "closed": closed, "owed": [path.name] if path is not None else []}
        if self.config.tuning.get("lora"):
            state["adapted_state_dict"] = {k: v.detach().cpu() for k, v in m.state_dict().items()}
        self.files.save(self.files.latest, self.model, self.config, epoch=epoch + 1, step=self.step, name=name,
                        weights=weights, optimizer=self.optimizer.state_dict(), train_state=state)
        if path is not None:
            self.files.save(path, self.model, self.config, epoch=epoch + 1, step=self.step, name=name, weights=weights)
        log.info("saved %s%s (epoch %d, step %d) in %.1fs", self.files.latest.name, f" and {path.name}" if path else "",
                 epoch + 1, self.step, time.perf_counter() - t)

    def _gather_rng(self) -> list:
        state = rng_state()
        if self.d.world == 1:
            return [state]
        out = [None] * self.d.world
        dist.all_gather_object(out, state)
        return out

    # ------------------------------------------------------------ validation

    def _validate(self, epoch: int) -> None:
        if not self.val_sets:
            return
        a = self.args
        err = None
        record = None
        if self.d.main:
            m = unwrap(self.model)
            for name, split in self.val_sets.items():
                t = time.perf_counter()
                rec = evaluate_split(m, split, self.config, device=self.d.device, batch_size=a.valid_batch_size,
                                     num_workers=a.valid_num_workers, precision=a.precision)
                loader = val_loader(split, resolution=self.config.image_resolution,
                                    context_length=self.config.context_length, prompt=self.config.text_prompt,
                                    batch_size=a.valid_batch_size, seed=a.seed, num_workers=a.valid_num_workers)
                rec.update(contrastive_eval(m, loader, device=self.d.device, precision=a.precision,
                                            same_text=a.same_text_positives))
                row = {"step": self.step, "epoch": epoch + 1, "kind": "valid", "set": name,
                       **{k: float(v) for k, v in rec.items()}, "logit_scale": float(m.logit_scale.detach().exp()),
                       "seconds": time.perf_counter() - t}
                self.files.log_row(row)
                log.info("valid %s @ step %d: R@1 %.2f R@5 %.2f R@10 %.2f mean %.2f | val loss %.4f",
                         name, self.step, row["r1"], row["r5"], row["r10"], row["mean_recall"], row.get("val_loss", float("nan")))
                if name == "valid":
                    record = row
            set_train_mode(self.model, self.config.tuning)
            if record is not None:
                self._track_best(record, epoch)
            if not a.no_plot:
                self._plot()
            if record is not None and self.on_validation is not None:
                try:
                    self.on_validation(dict(record))
                except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                    err = e
        if self.d.world > 1:
            flags = [err is not None, self.stop_early]
            dist.broadcast_object_list(flags, src=0)
            self.stop_early = flags[1]
            if flags[0] and not self.d.main:
                raise _Stop("stopped: the main process's validation callback raised")
        if err is not None:
            raise err

    def _track_best(self, record: dict, epoch: int) -> None:
        a = self.args
        if self.best is None or record["mean_recall"] > self.best["mean_recall"]:
            self.best = dict(record)
            self.bad_validations = 0
            self.files.save(self.files.best, self.model, self.config, epoch=epoch + 1, step=self.step, name=a.name,
                            metrics=dict(record))
            log.info("new best mean recall %.2f at step %d -> %s", record["mean_recall"], self.step, self.files.best)
        else:
            self.bad_validations += 1
            if a.early_stop_patience and self.bad_validations >= a.early_stop_patience:
                self.stop_early = True

    def _plot(self) -> None:
        try:
            plot_run(self.files.read_metrics(), self.files.plot, title=self.args.name)
        except Exception as e:  # a plot must never kill a training run
            log.warning("could not draw %s: %s", self.files.plot, e)


if __name__ == "__main__":
    sys.exit(run_cli(main))

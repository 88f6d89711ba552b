"""Fine-tune Chinese-CLIP: full, LoRA or frozen towers, prompts, recall validation, exact resume.

``bash Chinese-CLIP/train_clip.sh [flags]`` = ``python -m solution.train [flags]``; cn_clip's own
training flags keep their names, meanings and defaults (see :mod:`solution.training.flags`). The
flags are resolved once into a frozen :class:`~solution.training.run_config.TrainConfig`.
Multi-process: ``torchrun --nproc_per_node N -m solution.train ...`` (NCCL on GPU, gloo on CPU);
``--batch-size`` is per process. The main process writes every file and validates
(:mod:`solution.training.validation`: recall through ``solution.retrieval.encode.evaluate_split``)
while the other processes wait.

Outputs under ``{logs}/{name}/`` (see :mod:`solution.training.state`): checkpoints, ``params.json``,
``metrics.jsonl`` (``{"step", "epoch", "kind": "train"|"valid", ...}``), ``curves.png``. The main
process locks the run folder for the whole run, and a re-run resumes only under the flags the run
was trained with (see :mod:`solution.training.guard`); it first writes the checkpoints a killed run
still owed. With ``--grad-checkpointing`` the patch of :func:`cn_clip_patch.tuning.grad_checkpointing`
is held for the run and undone when it returns; the run's model math allows TF32 on CUDA
(:func:`solution.model.precision.model_math`, undone when it returns; validation's ranking stays
exact). ``--torchcompile`` compiles the towers' blocks (:mod:`solution.model.compiled`); the compile
seconds are logged, written as ``compile_s`` on the next train line and left out of its
``batch_time`` and ``pairs_per_s``.

This module is the loop: epochs and steps, train lines, when to validate and to save, checkpoints.

``main(argv, on_validation=None)`` returns ``{"run_dir", "best", "best_checkpoint",
"last_checkpoint", "params", "config"}`` (``params``: what ``params.json`` holds; ``config``: the
:class:`TrainConfig`). ``on_validation(record)`` is called after each validation of the main set
with its metrics record; an exception it raises (e.g. ``optuna.TrialPruned``) propagates after the
run directory is consistent (metrics, best.pt and the last epoch_latest.pt on disk).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from cn_clip_patch.tuning import grad_checkpointing, set_train_mode, unwrap
from solution.common import SolutionError, setup_logging
from solution.formats.run_files import MAIN_SET
from solution.model.compiled import CompileClock, compile_towers
from solution.model.precision import model_math

from .flags import extra_val_sets, parse_args
from .guard import agree, check_resume_flags, claim_run_folder
from .loaders import TrainBatches, open_split
from .run_config import TrainConfig, params_record, resolve, steps_per_epoch
from .setup import (
    Dist,
    build,
    find_start,
    init_distributed,
    load_optimizer_state,
    make_optimizer,
    make_scaler,
    make_scheduler,
    seed_process,
    wrap,
)
from .state import RunFiles, rng_state, set_rng_state, to_cpu, weights_for_checkpoint
from .step import StepConfig, Stepper
from .validation import BestTracker, Validation

log = logging.getLogger(__name__)


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
    cfg: TrainConfig

    def __init__(self, args, d: Dist, on_validation: Callable[[dict], object] | None):
        self.typed, self.d, self.on_validation = args, d, on_validation
        self.files = RunFiles(Path(args.logs) / args.name)
        self.epoch, self.micro, self.step = 0, 0, 0
        self.closed, self.owed = True, []  # end-of-epoch work done; checkpoints the resumed state still owes
        self.batches: TrainBatches | None = None  # the training loader, built once: its workers persist
        self.clock: CompileClock | None = None  # --torchcompile: compile seconds, kept out of step times
        self.compile_s = 0.0  # compile seconds since the last train line

    # ------------------------------------------------------------ setup

    def _open_data(self) -> None:
        """Open the splits and check that they fill a step (read-only: before the run folder is claimed)."""
        a = self.typed
        self.train_split = open_split(a.train_data, "--train-data")
        self.val_sets = {}
        if a.val_data:
            self.val_sets[MAIN_SET] = open_split(a.val_data, "--val-data")
        for name, path in extra_val_sets(a.extra_val_data).items():
            self.val_sets[name] = open_split(path, f"--extra-val-data {name}")
        steps_per_epoch(self.train_split.num_samples, a.batch_size, self.d.world, a.accum_freq, a.train_data)

    def _setup(self) -> None:
        a, d = self.typed, self.d
        own = agree(d, lambda: self.files.latest.is_file() and not a.no_auto_resume, share=True)  # one decision
        self.start = find_start(self.files.latest, a.resume, own=own)
        cfg = self.cfg = resolve(
            a, self.start, world=d.world, train_pairs=self.train_split.num_samples, device=str(d.device)
        )
        history = None
        if self.start.own:
            step = int(self.start.ckpt.get("step", 0))
            history = agree(
                d, lambda: check_resume_flags(self.files.run_dir, cfg.to_dict(), step, cfg.allow_changed_flags)
            )
        self.params = params_record(a, cfg, history)
        model = build(
            cfg.model_config,
            self.start,
            seed=cfg.seed,
            clip_weight_path=cfg.clip_weight_path,
            bert_weight_path=cfg.bert_weight_path,
            attn_impl=cfg.attn_impl,
        )
        if cfg.torchcompile:  # in place, inside DDP's wrapper; compiled at the first step (timed apart)
            compile_towers(model, d.device, cfg.torchcompile_backend)
            self.clock = CompileClock()
        self.model = wrap(model, d, cfg.use_bn_sync)  # first on the device: a fused AdamW where it has one
        self.optimizer = make_optimizer(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, wd=cfg.wd)
        if d.world > 1:
            seed_process(cfg.seed, d.rank)
        self.scheduler = make_scheduler(
            self.optimizer, lr=cfg.lr, warmup=cfg.warmup, total_steps=cfg.max_steps, constant=cfg.skip_scheduler
        )
        self.scaler = make_scaler(cfg.precision, d.device)
        self.stepper = Stepper(
            self.model,
            self.optimizer,
            self.scaler,
            StepConfig(
                d.device, cfg.precision, cfg.accum_freq, cfg.mask_ratio, cfg.same_text_positives, not cfg.skip_aggregate
            ),
        )
        self.tracker = BestTracker(cfg.early_stop_patience)
        self._restore()
        self.start_epoch = int(self.start.ckpt.get("epoch", 0)) if self.start.own else 0
        self.start.ckpt = None  # restored: do not hold its tensors (and optimizer state) for the whole run
        self.validation = Validation(self.val_sets, cfg, self.files, self.tracker, self.on_validation)

    def _restore(self) -> None:
        ckpt = self.start.ckpt
        if ckpt is None:
            return
        if self.start.own:
            self._restore_own(ckpt, ckpt.get("train_state") or {})
            return
        if not self.cfg.reset_data_offset:
            pos = (ckpt.get("train_state") or {}).get("position")
            if pos:
                self.epoch, self.micro = int(pos["epoch"]), int(pos["micro"])
            else:
                self.epoch = int(ckpt.get("epoch", 0))
            self.step = int(ckpt.get("step", 0))
            if self.step >= self.cfg.max_steps:
                log.warning(
                    "%s is at step %d, beyond --max-steps/--max-epochs (%d): nothing to train "
                    "(pass --reset-data-offset to fine-tune from it)",
                    self.start.source,
                    self.step,
                    self.cfg.max_steps,
                )
        if not self.cfg.reset_optimizer:
            self._load_optimizer(ckpt)

    def _restore_own(self, ckpt: dict, state: dict) -> None:
        """The exact resume of the run's own ``epoch_latest.pt``."""
        pos = state.get("position") or {"epoch": int(ckpt.get("epoch", 0)), "micro": 0}
        self.epoch, self.micro, self.step = int(pos["epoch"]), int(pos["micro"]), int(ckpt.get("step", 0))
        self._load_optimizer(ckpt)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.tracker = BestTracker(
            self.cfg.early_stop_patience, state.get("best"), int(state.get("bad_validations", 0))
        )
        self.owed = list(state.get("owed") or [])
        self.closed = state.get("closed")
        if self.closed is None:  # written before "closed" was recorded: a done final save wrote epoch_N.pt
            self.closed = self.micro == 0 or (
                self.micro < self.cfg.steps_per_epoch * self.cfg.accum_freq
                and self.files.epoch_path(self.epoch + 1).is_file()
            )
        rngs = state.get("rng") or []
        if len(rngs) == self.d.world:
            set_rng_state(rngs[self.d.rank])
        elif rngs:
            log.warning("RNG state saved by %d processes, now %d: not restored", len(rngs), self.d.world)
        log.info("resumed at epoch %d, micro-batch %d, step %d", self.epoch + 1, self.micro, self.step)

    def _load_optimizer(self, ckpt: dict) -> None:
        opt = ckpt.get("optimizer")
        if not opt:
            if not self.start.own:
                log.info("%s has no optimizer state: starting a fresh optimizer", self.start.source)
            return
        e = load_optimizer_state(self.optimizer, opt)
        if e is not None:
            if self.start.own:
                raise SolutionError(
                    f"{self.start.source}: optimizer state does not match this command's model/tuning "
                    f"({e}); use another --name or --no-auto-resume"
                )
            log.warning(
                "%s: optimizer state does not fit this model/tuning (%s); starting a fresh optimizer "
                "(as --reset-optimizer)",
                self.start.source,
                e,
            )

    def _validated_at(self, step: int) -> bool:
        """Whether the training loop validated at ``step`` (it does so before that step's checkpoint)."""
        return bool(self.val_sets and self.cfg.valid_step_interval and step % self.cfg.valid_step_interval == 0)

    # ------------------------------------------------------------ run

    def run(self) -> dict:
        self._open_data()
        with contextlib.ExitStack() as stack:
            agree(self.d, lambda: claim_run_folder(stack, self.files.run_dir, self.typed.logs))
            self._setup()
            stack.enter_context(model_math(self.d.device))  # TF32 for model math on CUDA; ranking stays exact
            if self.cfg.grad_checkpointing:
                stack.enter_context(grad_checkpointing(self.model))
            return self._run()

    def _run(self) -> dict:
        cfg, files = self.cfg, self.files
        if self.d.main:
            files.write_params(self.params)
            if self.start.own:
                files.pay_owed(
                    self.owed,
                    self.model,
                    cfg.model_config,
                    epoch=self.start_epoch,
                    step=self.step,
                    name=cfg.name,
                    best=self.tracker.best,
                )
                # a validation of the resumed step that is to be redone (the kill came before its
                # checkpoint) must not leave its first rows behind
                files.truncate_metrics(self.step, not self.closed and not self._validated_at(self.step))
            elif files.metrics.exists():
                files.metrics.unlink()
        set_train_mode(self.model, cfg.model_config.tuning)
        bar = tqdm(
            total=cfg.max_steps,
            initial=min(self.step, cfg.max_steps),
            desc=cfg.name,
            unit="step",
            disable=cfg.no_progress or not self.d.main,
            dynamic_ncols=True,
        )
        try:
            self._train(bar)
        finally:
            bar.close()
            if self.batches is not None:
                self.batches.close()
        if self.d.main and not cfg.no_plot:
            files.draw_curves(cfg.name)
        best = self.tracker.best
        last = files.latest if files.latest.is_file() else None
        best_ckpt = files.best if (best is not None and files.best.is_file()) else None
        return {
            "run_dir": str(files.run_dir),
            "best": best,
            "best_checkpoint": str(best_ckpt) if best_ckpt else None,
            "last_checkpoint": str(last) if last else None,
            "params": self.params,
            "config": cfg,
        }

    def _train(self, bar) -> None:
        cfg = self.cfg
        stop = cfg.steps_per_epoch * cfg.accum_freq
        while self.epoch < cfg.max_epochs:
            epoch = self.epoch
            if (self.step >= cfg.max_steps or self.tracker.stop) and (self.micro == 0 or self.closed):
                break  # done; else resumed at its last step before the final validation/saves were recorded
            validated_at = self.step if self._validated_at(self.step) else -1
            if self.micro < stop and self.step < cfg.max_steps and not self.tracker.stop:
                validated_at = self._train_epoch(epoch, stop, bar, validated_at)
            epoch_done = self.micro >= stop
            final = self.step >= cfg.max_steps or self.tracker.stop
            if (
                self.val_sets
                and cfg.valid_epoch_interval
                and validated_at != self.step
                and (final or (epoch + 1) % cfg.valid_epoch_interval == 0)
            ):
                self._validate(epoch)
            due = final or (cfg.save_epoch_frequency > 0 and (epoch + 1) % cfg.save_epoch_frequency == 0)
            self._save(self.files.epoch_path(epoch + 1) if due else None, epoch, advance=epoch_done, closed=True)
            if epoch_done:
                self.epoch, self.micro = epoch + 1, 0
        if self.tracker.stop and self.tracker.best is not None:
            log.info(
                "early stop: mean recall did not improve for %d validations (best %.2f at step %d)",
                self.tracker.bad,
                self.tracker.best["mean_recall"],
                self.tracker.best["step"],
            )

    def _train_epoch(self, epoch: int, stop: int, bar, validated_at: int) -> int:
        """Train epoch ``epoch`` from the current micro-batch to ``stop`` (or the last step, or an early
        stop); returns the step of the last validation."""
        cfg, mc = self.cfg, self.cfg.model_config
        if self.batches is None:
            self.batches = TrainBatches(
                self.train_split,
                resolution=mc.image_resolution,
                augment=cfg.augment,
                context_length=mc.context_length,
                prompt=mc.text_prompt,
                batch_size=cfg.batch_size,
                rank=self.d.rank,
                world=self.d.world,
                seed=cfg.seed,
                num_workers=cfg.num_workers,
                pin_memory=self.d.device.type == "cuda",
            )
        it = self.batches.epoch(epoch, self.micro, stop)
        t_data = time.perf_counter()
        while self.micro < stop and self.step < cfg.max_steps:
            batches = [next(it) for _ in range(cfg.accum_freq)]
            self.micro += cfg.accum_freq
            if self._skip(batches):
                continue
            self._compile_time()  # compiles outside steps (validation's eval mode) go to the next line
            t0 = time.perf_counter()
            lr = self.scheduler(self.step)
            out = self.stepper(batches)
            self.step += 1
            logged = self.step % cfg.log_interval == 0 or self.step == cfg.max_steps
            if logged:
                self.stepper.check()  # waits for the device: the step's time below is its real one
            dt = max(time.perf_counter() - t0 - self._compile_time(), 1e-9)  # torch.compile left out
            self.closed = False
            bar.update(1)
            if logged and self.d.main:
                self._log_step(self.stepper.read(out), lr, epoch, t0 - t_data, dt, bar)
            if cfg.valid_step_interval and self.step % cfg.valid_step_interval == 0:
                self._validate(epoch)
                validated_at = self.step
            if cfg.save_step_frequency > 0 and self.step % cfg.save_step_frequency == 0:
                self._save(self.files.epoch_path(epoch + 1, self.step), epoch)
            if self.tracker.stop:
                break
            t_data = time.perf_counter()
        return validated_at

    def _skip(self, batches: list) -> bool:
        """Whether to skip this step: a micro-batch of any process had no decodable image (agreed by all)."""
        bad = any(b is None for b in batches)
        if self.d.world > 1:
            flag = torch.tensor([int(bad)])  # on the CPU (gloo): no wait for the device
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.d.cpu_group)
            bad = bool(flag.item())
        if bad:
            log.warning("step %d: a batch had no decodable image; skipped on every process", self.step + 1)
        return bad

    def _compile_time(self) -> float:
        """``--torchcompile``: the compile seconds since the last call (logged; added to the next train line)."""
        spent = self.clock.lap() if self.clock is not None else 0.0
        if spent > 0:
            self.compile_s += spent
            log.info("torch.compile: %.1f s compiling at step %d (left out of the step time)", spent, self.step)
        return spent

    def _log_step(self, out: dict, lr: float, epoch: int, data_time: float, dt: float, bar) -> None:
        """The step's ``train`` line (main process, every ``--log-interval`` steps and the last; the
        divergence check and these reads are the only host syncs of a step). ``batch_time`` and
        ``pairs_per_s`` leave torch.compile out; ``compile_s`` (with ``--torchcompile``) holds the compile
        seconds since the previous line."""
        cfg = self.cfg
        bar.set_postfix(loss=f"{out['loss']:.4f}", scale=f"{out['logit_scale']:.2f}", lr=f"{lr:.2e}", refresh=False)
        row = {
            "step": self.step,
            "epoch": epoch + 1,
            "kind": "train",
            "loss": out["loss"],
            "lr": lr,
            "logit_scale": out["logit_scale"],
            "pairs_per_s": out["pairs"] / dt,
            "data_time": data_time,
            "batch_time": dt,
            "time": time.time(),
        }
        if cfg.report_training_batch_acc:
            row.update(acc_i2t=100 * out["acc_i2t"], acc_t2i=100 * out["acc_t2i"])
        if self.clock is not None:
            row["compile_s"], self.compile_s = self.compile_s, 0.0
        self.files.log_row(row)
        log.debug("step %d loss %.4f logit_scale %.2f lr %.3g", self.step, out["loss"], out["logit_scale"], lr)

    def _validate(self, epoch: int) -> None:
        self.stepper.check()
        self.validation(self.model, self.d, step=self.step, epoch=epoch)

    # ------------------------------------------------------------ checkpoints

    def _save(self, path: Path | None, epoch: int, advance: bool = False, closed: bool = False) -> None:
        """Write ``epoch_latest.pt``, then ``path`` (if any) from the same weights; ``advance`` = this epoch
        is complete, ``closed`` = its end-of-epoch/final work is done."""
        self.stepper.check()
        rngs = self._gather_rng()
        self.closed = closed
        if not self.d.main:
            return
        mc, name = self.cfg.model_config, self.cfg.name
        weights = weights_for_checkpoint(self.model, mc)
        pos = {"epoch": epoch + 1, "micro": 0} if advance else {"epoch": epoch, "micro": self.micro}
        t = time.perf_counter()
        state = {
            "position": pos,
            "rng": rngs,
            "best": self.tracker.best,
            "bad_validations": self.tracker.bad,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "closed": closed,
            "owed": [path.name] if path is not None else [],
        }
        if mc.tuning.get("lora"):
            state["adapted_state_dict"] = unwrap(self.model).state_dict()
        self.files.save(
            self.files.latest,
            self.model,
            mc,
            epoch=epoch + 1,
            step=self.step,
            name=name,
            weights=weights,
            optimizer=to_cpu(self.optimizer.state_dict()),
            train_state=to_cpu(state),
        )
        if path is not None:
            self.files.save(path, self.model, mc, epoch=epoch + 1, step=self.step, name=name, weights=weights)
        log.info(
            "saved %s%s (epoch %d, step %d) in %.1fs",
            self.files.latest.name,
            f" and {path.name}" if path else "",
            epoch + 1,
            self.step,
            time.perf_counter() - t,
        )

    def _gather_rng(self) -> list:
        state = rng_state()
        if self.d.world == 1:
            return [state]
        out = [None] * self.d.world
        dist.all_gather_object(out, state)
        return out

"""The training loop and ``main(argv, on_validation=None)`` (``python -m solution.train``; ``on_validation(record)``
after each main-set validation); under torchrun the main process writes every file and validates. A re-run resumes
``epoch_latest.pt`` and first writes the checkpoints a kill left unwritten: it ends as if never killed."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from cn_clip_patch.tuning import grad_checkpointing, has_lora, set_train_mode, unwrap
from solution.common import SolutionError, setup_logging, write_json, write_jsonl
from solution.formats.run_files import MAIN_SET, PARAMS, read_metrics
from solution.model.compiled import CompileClock, compile_towers
from solution.model.precision import model_math

from . import setup
from .flags import check_resume_flags, extra_val_sets, params_record, parse_args, resolve, steps_per_epoch
from .loaders import open_split, train_loader
from .state import RunFiles, claim_run_folder, rng_state, set_rng_state, to_cpu, weights_for_checkpoint
from .step import EMA, Stepper
from .validation import BestTracker, Validation

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None, on_validation: Callable[[dict], object] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    d = setup.init_distributed(args.device, args.dist_timeout_min, dict(os.environ))
    try:
        return Trainer(args, d, on_validation).run()
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(self, args, d: setup.Dist, on_validation: Callable[[dict], object] | None):
        self.args, self.d, self.on_validation = args, d, on_validation
        self.files = RunFiles(Path(args.logs) / args.name, args.name)
        self.epoch = self.micro = self.step = 0  # epoch index, micro-batches done in it, optimizer steps done
        self.loader = None  # built once: its workers persist

    def run(self) -> dict:
        a = self.args
        self.train_split = open_split(a.train_data, "--train-data")  # read-only checks before the folder is claimed
        self.val_sets = {MAIN_SET: open_split(a.val_data, "--val-data")} if a.val_data else {}
        for name, path in extra_val_sets(a.extra_val_data).items():
            self.val_sets[name] = open_split(path, f"--extra-val-data {name}")
        steps_per_epoch(self.train_split.num_samples, a.batch_size, self.d.world, a.accum_freq, a.train_data)
        with contextlib.ExitStack() as stack:
            setup.on_main(self.d, lambda: claim_run_folder(stack, self.files.run_dir, a.logs))
            self._setup()
            stack.enter_context(model_math(self.d.device))  # TF32 for model math on CUDA; ranking stays exact
            if self.cfg.grad_checkpointing:
                stack.enter_context(grad_checkpointing(self.model))
            return self._run()

    def _setup(self) -> None:
        a, d, files = self.args, self.d, self.files
        own = setup.on_main(d, lambda: files.latest.is_file() and not a.no_auto_resume)
        start = self.start = setup.find_start(files.latest, a.resume, own)
        pairs = self.train_split.num_samples
        cfg = self.cfg = resolve(a, start, world=d.world, train_pairs=pairs, device=str(d.device))
        history = None
        if own:
            step, record = int(start.ckpt.get("step", 0)), params_record(a, cfg)
            history = setup.on_main(d, lambda: check_resume_flags(files.run_dir, record, step, cfg.allow_changed_flags))
        self.params = params_record(a, cfg, history)
        model = setup.build(cfg, start)
        if cfg.torchcompile:  # in place, inside DDP's wrapper; compiled at the first step (timed apart)
            compile_towers(model, d.device)
        self.clock = CompileClock(cfg.torchcompile)
        self.model = setup.wrap(model, d, cfg.use_bn_sync)  # first on the device: a fused AdamW where it has one
        self.optimizer = setup.make_optimizer(model, cfg)
        if d.world > 1:  # dropout and --mask-ratio draws differ between processes
            torch.manual_seed(cfg.seed + d.rank)
        self.scheduler = setup.make_scheduler(self.optimizer, cfg)
        self.stepper = Stepper(self.model, self.optimizer, d.device, cfg)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.tracker = BestTracker(cfg.early_stop_patience)
        if start.ckpt is not None:
            self._restore(start.ckpt, start.ckpt.get("train_state") or {})
        start.ckpt = None  # restored: do not hold its tensors (and optimizer state) for the whole run
        self.validation = Validation(self.val_sets, cfg, files, self.tracker, self.on_validation)

    def _restore(self, ckpt: dict, state: dict) -> None:
        """Data position and optimizer of a starting checkpoint; for the run's own, all an exact resume needs."""
        cfg, own, source = self.cfg, self.start.is_own_run, self.start.source
        if own or not cfg.reset_data_offset:
            pos = state.get("position") or {"epoch": int(ckpt.get("epoch", 0)), "micro": 0}
            self.epoch, self.micro, self.step = int(pos["epoch"]), int(pos["micro"]), int(ckpt.get("step", 0))
        if own or not cfg.reset_optimizer:
            saved = ckpt.get("optimizer")
            e = setup.load_optimizer_state(self.optimizer, saved) if saved else "it has no optimizer state"
            if e is not None and own:
                raise SolutionError(f"{source}: optimizer state does not match this command's model/tuning ({e})")
            if e is not None:
                log.warning("%s: a fresh optimizer (%s)", source, e)
        if not own:
            if self.step >= cfg.max_steps:
                log.warning("%s is at step %d, the last: nothing to train (see --reset-data-offset)", source, self.step)
            return
        if state.get("scaler"):
            self.stepper.scaler.load_state_dict(state["scaler"])
        self.ema.load(state.get("ema"))
        self.tracker = BestTracker(cfg.early_stop_patience, state.get("best"), int(state.get("bad_validations", 0)))
        rngs = state.get("rng") or []
        if len(rngs) == self.d.world:
            set_rng_state(rngs[self.d.rank])
        elif rngs:
            log.warning("RNG state saved by %d processes, now %d: not restored", len(rngs), self.d.world)
        log.info("resumed at epoch %d, micro-batch %d, step %d", self.epoch + 1, self.micro, self.step)

    def _final(self) -> bool:
        return self.step >= self.cfg.max_steps or self.tracker.stop

    def _step_validation(self) -> bool:
        """Whether the loop validates right after the current step (before its checkpoints)."""
        return bool(self.val_sets and self.cfg.valid_step_interval and self.step % self.cfg.valid_step_interval == 0)

    def _due(self, final: bool, epoch_end: bool) -> list[Path]:
        """The checkpoints written after ``epoch_latest.pt`` at the current step (of epoch ``epoch``, from 1)."""
        cfg, s, epoch = self.cfg, self.step, self.epoch if self.micro == 0 else self.epoch + 1
        step_due = s > 0 and cfg.save_step_frequency > 0 and s % cfg.save_step_frequency == 0
        out = [self.files.epoch_path(epoch, s)] if step_due else []
        if final or (epoch_end and cfg.save_epoch_frequency > 0 and epoch % cfg.save_epoch_frequency == 0):
            out.append(self.files.epoch_path(epoch))
        return out

    def _prepare_folder(self) -> None:
        """``params.json``; on resume the checkpoints a kill left unwritten and ``metrics.jsonl`` cut to the step."""
        files = self.files
        write_json(files.run_dir / PARAMS, self.params)
        if self.start.is_own_run:  # from the very weights of their step
            lora = has_lora(unwrap(self.model))
            with self.ema.swapped():
                for path in self._due(self._final(), epoch_end=self.micro == 0):
                    if not path.is_file() or (lora and not (files.adapter_dir / path.name).is_file()):
                        self._write(path)
                        log.info("wrote %s, left unwritten by the interrupted run at step %d", path, self.step)
        if files.metrics.is_file():  # the lines after the step a re-run resumes (a torn one too; all on a fresh run)
            step = self.step if self.start.is_own_run else -1
            write_jsonl(files.metrics, [r for r in read_metrics(files.metrics) if r["step"] <= step])
        if self.cfg.report_to == "tensorboard" and not self._final():  # a finished run's left as it is
            files.open_board()
            for row in read_metrics(files.metrics):  # what metrics.jsonl holds (no set: an earlier version's main)
                files.log_row({"set": MAIN_SET, **row}, write=False)

    def _run(self) -> dict:
        cfg, files = self.cfg, self.files
        setup.on_main(self.d, self._prepare_folder)
        set_train_mode(self.model, cfg.model_config.tuning)
        shown = not cfg.no_progress and self.d.main and sys.stderr.isatty()
        shown = dict(total=cfg.max_steps, initial=min(self.step, cfg.max_steps), desc=cfg.name, disable=not shown)
        with tqdm(**shown, unit="step", dynamic_ncols=True) as bar:
            try:
                self._train(bar)
            finally:
                self.loader = None  # its workers end with it
                if files.board is not None:
                    files.board.close()
        if self.d.main and not cfg.no_plot:
            files.draw_curves(cfg.name)
        return {
            "run_dir": str(files.run_dir),
            "best": self.tracker.best,
            "best_checkpoint": str(files.best) if self.tracker.best and files.best.is_file() else None,
            "last_checkpoint": str(files.latest) if files.latest.is_file() else None,
            "params": self.params,
            "config": cfg,
        }

    def _train(self, bar) -> None:
        cfg, stop = self.cfg, self.cfg.steps_per_epoch * self.cfg.accum_freq  # micro-batches in an epoch
        while self.epoch < cfg.max_epochs and not self._final():
            if self.micro < stop and not self._final():
                self._train_epoch(stop, bar)
            interval = cfg.valid_epoch_interval
            due = interval and (self._final() or (self.epoch + 1) % interval == 0)
            if self.val_sets and due and not self._step_validation():
                self._validate()
            epoch_end = self.micro >= stop
            if epoch_end:
                self.epoch, self.micro = self.epoch + 1, 0
            self._save(self._due(self._final(), epoch_end))
        if self.tracker.stop and self.tracker.best is not None:
            best, bad = self.tracker.best, self.tracker.bad
            log.info("early stop: no better mean recall than step %d's in %d validations", best["step"], bad)

    def _train_epoch(self, stop: int, bar) -> None:
        """Train the current epoch up to micro-batch ``stop``, the last step or an early stop."""
        cfg = self.cfg
        if self.loader is None:
            self.loader = train_loader(self.train_split, cfg, self.d.rank, self.d.world, self.d.device.type == "cuda")
        self.loader.batch_sampler.set_epoch(self.epoch, self.micro, stop)
        it, t_data = iter(self.loader), time.perf_counter()
        while self.micro < stop and not self._final():
            batches = [next(it) for _ in range(cfg.accum_freq)]
            self.micro += cfg.accum_freq
            if self._skip(batches):
                continue
            self.clock.lap(self.step)  # compiles outside steps (validation's eval mode) go to the next line
            t0 = time.perf_counter()
            lr = self.scheduler(self.step)
            out = self.stepper(batches)
            self.ema.update()
            self.step += 1
            logged = self.step % cfg.log_interval == 0 or self.step == cfg.max_steps
            if logged:
                self.stepper.check()  # waits for the device: the step's time below is its real one
            dt = max(time.perf_counter() - t0 - self.clock.lap(self.step), 1e-9)  # torch.compile left out
            bar.update(1)
            if logged and self.d.main:
                self._log_step(self.stepper.read(out), lr, t0 - t_data, dt, bar)
            if self._step_validation():
                self._validate()
            if self.micro < stop and not self._final() and self._due(False, False):
                self._save(self._due(False, False))  # at an epoch's end or the last step: saved with its work
            t_data = time.perf_counter()

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

    def _log_step(self, out: dict, lr: float, data_time: float, dt: float, bar) -> None:
        """The step's ``train`` line (times without torch.compile, its seconds since the last line in ``compile_s``)."""
        row = {"step": self.step, "epoch": self.epoch + 1, "kind": "train", "loss": out["loss"], "lr": lr}
        row.update(logit_scale=out["logit_scale"], pairs_per_s=out["pairs"] / dt, data_time=data_time, batch_time=dt)
        row["time"] = time.time()
        if self.cfg.report_training_batch_acc:
            row.update(acc_i2t=100 * out["acc_i2t"], acc_t2i=100 * out["acc_t2i"])
        if self.cfg.torchcompile:
            row["compile_s"], self.clock.unreported = self.clock.unreported, 0.0
        self.files.log_row(row)
        if bar.disable:
            msg = "step %d/%d: loss %.4f, lr %.2e, logit scale %.2f, %.1f pairs/s"
            log.info(msg, self.step, self.cfg.max_steps, row["loss"], lr, row["logit_scale"], row["pairs_per_s"])
        else:
            bar.set_postfix(loss=f"{row['loss']:.4f}", scale=f"{row['logit_scale']:.2f}", lr=f"{lr:.2e}", refresh=False)

    def _validate(self) -> None:
        self.stepper.check()
        with self.ema.swapped():
            self.validation(self.model, self.d, step=self.step, epoch=self.epoch)

    def _write(self, path: Path, weights=None, **extra) -> None:
        epoch = self.epoch if self.micro == 0 else self.epoch + 1  # the one the step was trained in
        self.files.save(path, self.model, self.cfg.model_config, weights=weights, epoch=epoch, step=self.step, **extra)

    def _save(self, paths: list[Path]) -> None:
        """``epoch_latest.pt`` (resumable: optimizer, data position, RNG, EMA, ...), then ``paths`` (the EMA's)."""
        self.stepper.check()
        rngs = [rng_state()]
        if self.d.world > 1:
            rngs = [None] * self.d.world
            dist.all_gather_object(rngs, rng_state())
        if not self.d.main:
            return
        t, mc = time.perf_counter(), self.cfg.model_config
        state = {"position": {"epoch": self.epoch, "micro": self.micro}, "rng": rngs, "best": self.tracker.best}
        state.update(bad_validations=self.tracker.bad, scaler=self.stepper.scaler.state_dict(), ema=self.ema.shadow)
        if mc.tuning.get("lora"):
            state["adapted_state_dict"] = unwrap(self.model).state_dict()
        weights, optimizer = weights_for_checkpoint(self.model, mc), to_cpu(self.optimizer.state_dict())
        self._write(self.files.latest, weights, optimizer=optimizer, train_state=to_cpu(state))
        with self.ema.swapped():
            weights = weights_for_checkpoint(self.model, mc) if self.ema.params and paths else weights
            for path in paths:
                self._write(path, weights)
        names = ", ".join(p.name for p in [self.files.latest, *paths])
        log.info("saved %s (step %d) in %.1fs", names, self.step, time.perf_counter() - t)

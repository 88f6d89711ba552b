"""The trainer's flags (:data:`TABLE`, cn_clip's and ours: the parser, ``--config FILE.yaml``, checks and
:data:`NOT_SETTINGS` follow from it), a run's resolved :data:`TrainConfig`, ``params.json``, the resume guard."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from cn_clip_patch.prompt import PromptError, check_prompt
from cn_clip_patch.tuning import tuning_recipe
from solution.common import SolutionError, read_yaml_mapping
from solution.data.datasets import AUGMENTS
from solution.formats.run_files import MAIN_SET, PARAMS, read_params
from solution.model import ATTN_IMPLS, ModelConfig, resolve_config
from solution.model.precision import PRECISION_METAVAR, PRECISIONS, precision_flag
from solution.plots import REPORT_TO

from .setup import Start

log = logging.getLogger(__name__)

PRECISION_HELP = "amp/fp16: float16 autocast + GradScaler on CUDA (fp32 on CPU); bf16 (amp_bf16); fp32."
EMA_HELP = "Validate and save ema = D x ema + (1 - D) x w of the trained weights, from the start's; 0: off."
LAYER_HELP = "lr x R^(n+1-d) per tower of n blocks, depth d: 0 embeddings, i+1 block i, n+1 norm/projections; 1: off."
# What a changed value does on a re-run that resumes the run's own checkpoint:
TRAINS = "trains"  # changes what is trained: refused unless --allow-changed-flags
FREE = "free"  # logging, workers, device, schedules of validation and saves, speed: logged
START = "start"  # where a run starts, or a flag resolved into another one: not compared
DEFAULT_VISION, DEFAULT_TEXT, DEFAULT_CONTEXT = "ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 52
FALLBACK_OPTIM = {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
RUN_FACTS = ("model_config", "world_size", "global_batch_size", "steps_per_epoch", "resumed_from", "train_pairs")
TUNING = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "freeze_vision", "freeze_text")
STEPS, BATCH = "max steps (--max-steps/--max-epochs)", "--batch-size x processes"


class FlagError(SolutionError):
    """A refused flag value: ``flag`` names it (None where no one flag is at fault)."""

    def __init__(self, flag: str | None, message: str):
        super().__init__(message)
        self.flag = flag


def _range(ok: Callable[[float], bool], what: str) -> Callable[[object, str], None]:
    def check(v, flag: str) -> None:
        if not ok(v):
            raise FlagError(flag, f"{flag} {v} is out of range: {what}")

    return check


POSITIVE = _range(lambda v: v >= 1, "must be a positive integer")
OFF_OR_N = _range(lambda v: v >= -1, "must be -1 or more (-1, 0: off)")
AT_LEAST_0 = _range(lambda v: v >= 0, "must be 0 or more")
ABOVE_0 = _range(lambda v: v > 0, "must be greater than 0")
FRACTION = _range(lambda v: 0 <= v < 1, "must be in [0, 1)")
SEED = _range(lambda v: 0 <= v < 2**31, "must be in [0, 2^31)")
DECAY = _range(lambda v: 0 < v <= 1, "must be in (0, 1]")
DEVICE = _range(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "must be auto, cpu, cuda or cuda:N")


def _regex(value: str, flag: str) -> None:
    try:
        re.compile(value)
    except re.error as e:
        raise FlagError(flag, f"{flag} {value!r} is not a valid regular expression ({e})") from None


def _run_name(name: str, flag: str) -> None:
    norm = os.path.normpath(name) if name else ""
    if not name or "\0" in name or os.path.isabs(name) or norm in (".", "..") or norm.startswith(".." + os.sep):
        raise FlagError(flag, f"{flag} {name!r} leaves --logs: give a folder name inside it (e.g. exp1 or exp/run1)")


def extra_val_sets(items: Sequence[str] | None, flag: str = "--extra-val-data") -> dict[str, str]:
    """``--extra-val-data NAME=LMDB ...`` as ``{name: path}``."""
    extra: dict[str, str] = {}
    for item in items or []:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise FlagError(flag, f"{flag} expects NAME=LMDB, got {item!r}")
        if name == MAIN_SET or name in extra:
            raise FlagError(flag, f"{flag}: duplicate set name {name!r}")
        extra[name] = path
    return extra


@dataclass(frozen=True)
class Flag:
    """``resume``: TRAINS, FREE or START; ``shown``: in ``compare``; ``check(value, flag)`` raises FlagError."""

    name: str
    default: object
    help: str | None
    resume: str
    _: KW_ONLY
    shown: bool = True
    check: Callable[[object, str], object] | None = None
    type: Callable | None = None
    choices: Sequence | None = None
    nargs: str | None = None
    metavar: str | None = None
    refused: bool = False  # accepted for cn_clip, refused when set
    aliases: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    @property
    def parse(self) -> Callable:
        return self.type or (str if self.default is None or self.nargs else type(self.default))

    def validate(self, value) -> None:
        if self.refused and value:
            raise FlagError(self.name, f"{self.name} is not supported by this trainer")
        if isinstance(value, float) and not math.isfinite(value):
            raise FlagError(self.name, f"{self.name} {value} is out of range: must be a finite number")
        if value is not None and self.check is not None:
            self.check(value, self.name)


F = Flag
TABLE: list[str | Flag] = [  # a group's title, then its flags
    "data (cn_clip flags)",
    F("--train-data", None, "LMDB directory of the training split (imgs/ and pairs/).", TRAINS, shown=False),
    F("--val-data", None, "LMDB directory of the validation split; none: no validation.", TRAINS, shown=False),
    F("--extra-val-data", [], "More validation sets: NAME=LMDB.", TRAINS, shown=False, check=extra_val_sets, nargs="*"),
    F("--num-workers", 4, "Training DataLoader workers.", FREE, shown=False, check=AT_LEAST_0),
    F("--valid-num-workers", 1, "Validation DataLoader workers.", FREE, shown=False, check=AT_LEAST_0),
    F("--use-augment", False, "cn_clip's image augmentation (same as --augment cnclip).", START),
    F("--augment", None, "none, cnclip (upstream AutoAugment), gentle (crop, flip, colour).", TRAINS, choices=AUGMENTS),
    F("--context-length", None, "Tokens per text (default: the start's, else 52).", TRAINS, check=POSITIVE, type=int),
    F("--text-prompt", None, "Prepended to each text, then at inference too (default: the start's).", TRAINS),
    F("--valid-image-cache-gb", 8.0, "GiB of validation images kept decoded.", FREE, shown=False, check=AT_LEAST_0),
    "output (cn_clip flags)",
    F("--logs", "./logs/", "Root of run directories.", START, shown=False),
    F("--name", "train_clip", "Run folder in --logs (may be a/b); one writer.", START, shown=False, check=_run_name),
    F("--log-interval", 10, "Write a train line to metrics.jsonl every N steps.", FREE, shown=False, check=POSITIVE),
    F("--report-training-batch-acc", False, "Log the in-batch i2t/t2i accuracy.", FREE, shown=False),
    F("--save-epoch-frequency", 1, "Write checkpoints/epoch_{N}.pt every N epochs.", FREE, check=AT_LEAST_0),
    F("--save-step-frequency", -1, "Also checkpoint every N steps (epoch_{N}_{step}.pt).", FREE, check=OFF_OR_N),
    F("--no-plot", False, "Do not draw curves.png.", FREE, shown=False),
    F("--no-progress", False, "No bar (on a terminal only; else a log line per train line).", FREE, shown=False),
    F("--report-to", "", "tensorboard: event files in {run}/tensorboard/.", FREE, shown=False, choices=REPORT_TO),
    "model (cn_clip flags)",
    F("--vision-model", None, "Vision architecture; default from --resume, else ViT-B-16.", TRAINS),
    F("--text-model", None, "Text architecture; default from --resume, else RoBERTa-wwm-ext-base-chinese.", TRAINS),
    F("--resume", None, "Start from a checkpoint (official, cn_clip's or ours); the run's own one wins.", START),
    F("--no-auto-resume", False, "Ignore the run's own epoch_latest.pt.", START, shown=False),
    F("--allow-changed-flags", False, "Resume the run's own checkpoint under changed training flags.", START),
    F("--reset-optimizer", False, "When resuming, start with a fresh optimizer.", START),
    F("--reset-data-offset", False, "When resuming, start at epoch 0, step 0.", START),
    F("--clip-weight-path", None, "cn_clip: OpenAI CLIP weights for the image tower.", START),
    F("--bert-weight-path", None, "cn_clip: BERT weights for the text tower.", START),
    F("--mask-ratio", 0.0, "FLIP patch masking ratio for ViT (cn_clip).", TRAINS, check=FRACTION),
    F("--grad-checkpointing", False, "Recompute activations in backward.", FREE),
    F("--use-flash-attention", False, "Refused (PyTorch SDPA is used instead).", START, refused=True),
    F("--attn-impl", "sdpa", "Text-tower attention: sdpa, or cn_clip's own (upstream).", FREE, choices=ATTN_IMPLS),
    F("--use-bn-sync", False, "SyncBatchNorm under DDP (ResNet).", TRAINS),
    F("--torchcompile", False, "torch.compile the towers' blocks (compile time logged apart).", FREE),
    "tuning",
    F("--freeze-vision", False, "No gradient for the image tower (cn_clip).", TRAINS),
    F("--freeze-text", False, "No gradient for the text tower.", TRAINS),
    F("--lora-rank", 0, "LoRA rank on both towers; 0 = full fine-tuning.", TRAINS, check=AT_LEAST_0),
    F("--lora-alpha", None, "LoRA alpha (default 2 x rank).", TRAINS, check=ABOVE_0, type=float),
    F("--lora-dropout", 0.0, "LoRA dropout.", TRAINS, check=FRACTION),
    F("--lora-targets", None, "Regex of modules to adapt (default: ViT attention, BERT q/k/v).", TRAINS, check=_regex),
    "optimisation (cn_clip flags)",
    F("--batch-size", 64, "Batch size per process.", TRAINS, check=POSITIVE),
    F("--valid-batch-size", 64, "Validation batch size per process.", FREE, shown=False, check=POSITIVE),
    F("--max-steps", None, "Steps to train (wins over --max-epochs).", TRAINS, check=POSITIVE, type=int),
    F("--max-epochs", 32, None, START, check=POSITIVE),
    F("--valid-step-interval", None, "Validate every N steps.", FREE, check=POSITIVE, type=int),
    F("--valid-epoch-interval", 1, "Validate every N epochs (0 disables).", FREE, check=AT_LEAST_0),
    F("--lr", None, "Learning rate (default per vision model as cn_clip).", TRAINS, check=AT_LEAST_0, type=float),
    F("--beta1", None, None, TRAINS, check=FRACTION, type=float),
    F("--beta2", None, None, TRAINS, check=FRACTION, type=float),
    F("--eps", None, None, TRAINS, check=ABOVE_0, type=float),
    F("--wd", 0.2, "Weight decay (none on biases, norms, logit_scale).", TRAINS, check=AT_LEAST_0),
    F("--warmup", 500, "Linear warmup steps, then cosine decay.", TRAINS, check=AT_LEAST_0),
    F("--skip-scheduler", False, "Constant learning rate.", TRAINS),
    F("--accum-freq", 1, "Feature-caching gradient accumulation (cn_clip's).", TRAINS, check=POSITIVE),
    F("--precision", "amp", PRECISION_HELP, TRAINS, type=precision_flag, choices=PRECISIONS, metavar=PRECISION_METAVAR),
    F("--same-text-positives", True, "Texts of one text_id are not each other's negatives.", TRAINS),
    F("--ema-decay", 0.0, EMA_HELP, TRAINS, check=FRACTION, metavar="D"),
    F("--layer-decay", 1.0, LAYER_HELP, TRAINS, check=DECAY, metavar="R"),
    F("--early-stop-patience", None, "Stop after N validations with no new best.", TRAINS, check=POSITIVE, type=int),
    F("--seed", 123, None, TRAINS, check=SEED),
    F("--device", "auto", "auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK).", FREE, shown=False, check=DEVICE),
    F("--dist-timeout-min", 120.0, "Minutes the others wait for the main process.", FREE, shown=False, check=ABOVE_0),
    "accepted for compatibility with cn_clip",
    F("--gather-with-grad", False, "Always on here: features are gathered with gradient.", START),
    F("--skip-aggregate", False, "Contrast only within each process's batch.", TRAINS),
    F("--debug", False, "Debug logging.", FREE, shown=False),
    F("--distillation", False, "Refused.", START, refused=True),
    F("--teacher-model-name", None, None, START),
    F("--kd-loss-weight", 0.5, None, START, aliases=("--kd_loss_weight",)),
]
FLAGS: dict[str, Flag] = {f.dest: f for f in TABLE if isinstance(f, Flag)}
# params.json keys compare does not show as a run's settings (torchcompile_backend: written by earlier versions)
NOT_SETTINGS = frozenset(
    [k for k, f in FLAGS.items() if not f.shown]
    + ["config", "typed", "flag_changes", "model_config", "torchcompile_backend"]
)
TrainConfig = dataclasses.make_dataclass("TrainConfig", ["config", *FLAGS, *RUN_FACTS], frozen=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise FlagError(None, message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m solution.train", description="Fine-tune Chinese-CLIP.", exit_on_error=False)
    p.add_argument("--config", help="YAML file of flag values (keys are flag names); flags given here win.")
    for f in TABLE:
        if isinstance(f, str):
            g = p.add_argument_group(f)
        elif f.parse is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            g.add_argument(*f.aliases, f.name, dest=f.dest, action=action, default=f.default, help=f.help)
        else:
            kw = dict(type=f.parse, default=f.default, help=f.help, choices=f.choices, metavar=f.metavar)
            g.add_argument(*f.aliases, f.name, dest=f.dest, nargs=f.nargs, **kw)
    return p


def _config_argv(path: str) -> list[str]:
    """The config file as command-line words, so that the parser reads and checks it as it reads the command line."""
    argv = []
    for key, value in read_yaml_mapping(path, "config file").items():
        f = FLAGS.get(str(key).lstrip("-").replace("-", "_"))
        if f is None:
            raise FlagError(None, f"{path}: unknown key {key!r} (keys are training flag names, e.g. batch-size)")
        if f.parse is bool and not isinstance(value, bool) and value is not None:
            raise FlagError(f.name, f"{path}: {key} = {value!r} is not true or false")
        if f.parse is bool and value is not None:
            argv += [f.name] if value else [f"--no-{f.name[2:]}"] if f.default else []
        elif f.nargs and value is not None:
            items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else value
            argv += [f.name, *map(str, [items] if isinstance(items, str) else items)]
        elif value is not None:  # null: the flag's default
            argv.append(f"{f.name}={value}")
    return argv


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str = "") -> argparse.Namespace:
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise FlagError(e.argument_name and e.argument_name.split("/")[-1], f"{where}{e}") from None
    if unknown:
        raise FlagError(unknown[0], f"{where}unrecognized arguments: {' '.join(unknown)}")
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags as typed (command line over config file over defaults), checked; nothing derived."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = _parse(build_parser(), argv).config
    from_config = _config_argv(config) if config else []
    for words, where in ((from_config, f"{config}: "), (from_config + argv, "")):  # the file's values first
        args = _parse(build_parser(), words, where)
        for f in FLAGS.values():
            try:
                f.validate(getattr(args, f.dest))
            except FlagError as e:
                raise FlagError(e.flag, f"{where}{e}") from None
    if not args.train_data:
        raise FlagError("--train-data", "--train-data is required (an LMDB directory with imgs/ and pairs/)")
    lora = [FLAGS[k].name for k in ("lora_alpha", "lora_dropout", "lora_targets") if vars(args)[k] != FLAGS[k].default]
    if lora and not args.lora_rank:
        raise FlagError(lora[0], f"{lora[0]} needs --lora-rank (LoRA is off)")
    return args


def steps_per_epoch(train_pairs: int, batch_size: int, world: int, accum_freq: int, train_data: str) -> int:
    if batch_size * world > train_pairs:
        raise SolutionError(
            f"batch size {batch_size} x {world} process(es) = {batch_size * world} is larger than "
            f"the {train_pairs} training pairs in {train_data}"
        )
    micro = -(-train_pairs // (batch_size * world))  # the last one padded from the epoch's start
    if micro < accum_freq:
        raise SolutionError(f"--accum-freq {accum_freq} needs {accum_freq} batches per step but an epoch has {micro}")
    return micro // accum_freq


def model_config(args: argparse.Namespace, start: Start) -> ModelConfig:
    """The model the run trains: flags first, then the starting checkpoint's (its recorded architecture included)."""
    recipe = tuning_recipe(**{k: vars(args)[k] for k in TUNING})
    if start.ckpt is not None:
        named = dict(vision_model=args.vision_model, text_model=args.text_model, text_prompt=args.text_prompt)
        m = resolve_config(start.ckpt, **named, context_length=args.context_length, source=start.source)
        config = dataclasses.replace(m, tuning=recipe)
    else:
        vision, text = args.vision_model or DEFAULT_VISION, args.text_model or DEFAULT_TEXT
        context, prompt = args.context_length or DEFAULT_CONTEXT, args.text_prompt or ""
        config = ModelConfig(vision, text, context_length=context, text_prompt=prompt, tuning=recipe)
    context = config.context_length
    positions = int(config.model_info.get("text_max_position_embeddings", 512))
    if context > positions:
        raise FlagError("--context-length", f"--context-length {context}: the text model has {positions} positions")
    try:
        check_prompt(config.text_prompt, config.context_length)
    except PromptError as e:
        raise FlagError("--text-prompt", f"--text-prompt: {e}") from None
    return config


def resolve(args: argparse.Namespace, start: Start, *, world: int, train_pairs: int, device: str) -> TrainConfig:
    """The run's :data:`TrainConfig` from the typed flags (left unchanged), its start and its facts."""
    from cn_clip.training.params import get_default_params

    model = model_config(args, start)
    values = dict(vars(args))
    optim = {**FALLBACK_OPTIM, **get_default_params(model.vision_model)}
    values.update({k: optim[k] for k in FALLBACK_OPTIM if values[k] is None})
    per_epoch = steps_per_epoch(train_pairs, args.batch_size, world, args.accum_freq, args.train_data)
    if args.max_steps is not None:
        values["max_epochs"] = -(-args.max_steps // per_epoch)
    else:
        values["max_steps"] = per_epoch * args.max_epochs
    lora = model.tuning.get("lora") or {}
    values.update({k: getattr(model, k) for k in ("vision_model", "text_model", "context_length", "text_prompt")})
    values.update(lora_alpha=lora.get("alpha", args.lora_alpha), lora_targets=lora.get("targets", args.lora_targets))
    values.update(extra_val_data=list(args.extra_val_data or ()), device=device, model_config=model)
    values.update(augment=args.augment or ("cnclip" if args.use_augment else "none"), resumed_from=start.source)
    global_batch = args.batch_size * world * args.accum_freq
    values.update(world_size=world, global_batch_size=global_batch, steps_per_epoch=per_epoch, train_pairs=train_pairs)
    return TrainConfig(**values)


def params_record(args: argparse.Namespace, cfg: TrainConfig, flag_changes: list | None = None) -> dict:
    """``params.json``: resolved values, facts, consented flag changes and the flags as typed (``typed``)."""
    record = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    record["model_config"] = cfg.model_config.to_dict()
    if flag_changes:
        record["flag_changes"] = list(flag_changes)
    return {**record, "typed": dict(vars(args))}


def training_flags(p: Mapping) -> dict[str, object]:
    """The values of a ``params.json`` whose change changes what a run trains, by how a refusal names them."""
    compared = [k for k, f in FLAGS.items() if f.resume == TRAINS and k in p and k not in ("max_steps", "batch_size")]
    out = {FLAGS[k].name: FLAGS[k].parse(p[k]) if isinstance(p[k], str) else p[k] for k in compared}
    if "max_steps" in p:
        out[STEPS] = p["max_steps"]
    if "batch_size" in p:
        out[BATCH] = int(p["batch_size"]) * int(p.get("world_size") or 1)
    return out


def _real(flag: str, v):
    """A flag's value as a resume compares it: data folders however spelled."""
    if flag == "--extra-val-data":
        return {name: os.path.realpath(path) for name, path in extra_val_sets(v).items()}
    return os.path.realpath(v) if v and flag in ("--train-data", "--val-data") else v


def _changes(pairs) -> str:
    return "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in pairs)


def check_resume_flags(run_dir: Path, params: Mapping, step: int, allow: bool) -> list[dict]:
    """Refuse changed training flags unless ``allow``; the flag-change history, with this re-run's changes."""
    try:
        saved = read_params(run_dir)
    except SolutionError as e:
        raise SolutionError(f"{e}; restore or remove it to resume this run, or pass --no-auto-resume") from None
    if saved is None:
        log.warning("%s is missing: cannot check that this command's flags match the run's", run_dir / PARAMS)
        return []
    old, new = training_flags(saved), training_flags(params)
    changed = {k: (old[k], new[k]) for k in old if k in new and _real(k, old[k]) != _real(k, new[k])}
    free = [(f.name, (saved[k], params[k])) for k, f in FLAGS.items() if f.resume == FREE and k in saved]
    free = [(name, (a, b)) for name, (a, b) in free if a != b]
    if free:
        log.info("resuming under other flags that do not change the training than %s: %s", PARAMS, _changes(free))
    history = list(saved.get("flag_changes") or [])
    if changed and not allow:
        raise SolutionError(
            f"run folder {run_dir} was trained with other flags than this command's (its params.json): "
            f"{_changes(changed.items())}. Re-run with the run's flags, pass --allow-changed-flags to continue it from "
            f"step {step} under the new ones, or use another --name (or --no-auto-resume to start it over); logging, "
            "worker, device, validation- and save-schedule flags may change freely"
        )
    if changed:
        log.warning("resuming %s at step %d under changed flags: %s", run_dir, step, _changes(changed.items()))
        history.append({"step": int(step), "changes": {k: [a, b] for k, (a, b) in changed.items()}})
    return history

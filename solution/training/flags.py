"""Command line of the trainer: cn_clip's own training flags (same names, meanings and defaults)
plus this project's additions, and ``--config FILE.yaml`` whose keys are flag names.

Precedence: built-in defaults < config file < command line. A config file holds only the
differences from the defaults, e.g.::

    train-data: data/lmdb/train
    val-data: data/lmdb/valid
    vision-model: ViT-B-16
    text-model: RoBERTa-wwm-ext-base-chinese
    lora-rank: 8
    text-prompt: "这是一张图片，里面存在商品："

Keys may use dashes or underscores; ``null`` means the flag's default. Unknown keys are an error
naming the key. Numbers out of range (a negative LoRA rank, a dropout of 1, ...) are refused.

:func:`parse_args` returns the flags as typed (checked, never rewritten): a flag left to be
inherited or derived stays ``None``. What a run resolves them to (model, prompt, learning rate,
steps, ...) is :class:`solution.training.run_config.TrainConfig`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from solution.common import SolutionError, read_yaml_mapping
from solution.data.datasets import AUGMENTS
from solution.formats.run_files import MAIN_SET
from solution.model import ATTN_IMPLS
from solution.model.compiled import BACKENDS as COMPILE_BACKENDS
from solution.model.precision import PRECISION_METAVAR, PRECISIONS, precision_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m solution.train",
        description="Fine-tune Chinese-CLIP (full, LoRA or frozen towers) with recall validation.",
    )
    p.add_argument(
        "--config", default=None, help="YAML file of flag values (keys are flag names); flags given here win."
    )
    g = p.add_argument_group("data (cn_clip flags)")
    g.add_argument("--train-data", default=None, help="LMDB directory of the training split (has imgs/ and pairs/).")
    g.add_argument("--val-data", default=None, help="LMDB directory of the validation split; none disables validation.")
    g.add_argument(
        "--extra-val-data",
        nargs="*",
        default=[],
        metavar="NAME=LMDB",
        help="More validation sets, each scored and logged under NAME (e.g. general=data/general/lmdb/valid).",
    )
    g.add_argument("--num-workers", type=int, default=4, help="Training DataLoader workers.")
    g.add_argument("--valid-num-workers", type=int, default=1, help="Validation DataLoader workers.")
    g.add_argument(
        "--use-augment", action="store_true", help="cn_clip's image augmentation (same as --augment cnclip)."
    )
    g.add_argument(
        "--augment",
        choices=AUGMENTS,
        default=None,
        help="none | cnclip (upstream AutoAugment) | gentle (RandomResizedCrop 0.8-1, flip, mild ColorJitter).",
    )
    g.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="Max text tokens incl. [CLS]/[SEP]; default: the starting checkpoint's, else 52.",
    )
    g.add_argument(
        "--text-prompt",
        default=None,
        help="Prepended to every text in training, validation and later inference; default: the starting "
        "checkpoint's prompt, else none (--text-prompt '' removes an inherited one).",
    )

    g = p.add_argument_group("output (cn_clip flags)")
    g.add_argument("--logs", default="./logs/", help="Root of run directories.")
    g.add_argument(
        "--name",
        default="train_clip",
        help="Run directory name under --logs (may hold subfolders, never leave --logs). One training "
        "writes a run directory at a time (a second one is refused, naming the first).",
    )
    g.add_argument("--log-interval", type=int, default=10, help="Write a train line to metrics.jsonl every N steps.")
    g.add_argument("--report-training-batch-acc", action="store_true", help="Log the in-batch i2t/t2i accuracy.")
    g.add_argument("--save-epoch-frequency", type=int, default=1, help="Write checkpoints/epoch_{N}.pt every N epochs.")
    g.add_argument(
        "--save-step-frequency", type=int, default=-1, help="Also checkpoint every N steps (epoch_{N}_{step}.pt)."
    )
    g.add_argument("--no-plot", action="store_true", help="Do not draw curves.png.")
    g.add_argument("--no-progress", action="store_true", help="No tqdm bar.")

    g = p.add_argument_group("model (cn_clip flags)")
    g.add_argument(
        "--vision-model",
        default=None,
        help="Vision architecture (cn_clip's configs or configs/models); default from --resume, else ViT-B-16.",
    )
    g.add_argument(
        "--text-model",
        default=None,
        help="Text architecture; default from --resume, else RoBERTa-wwm-ext-base-chinese.",
    )
    g.add_argument(
        "--resume",
        default=None,
        help="Start from a checkpoint: official Chinese-CLIP, cn_clip training, or ours. "
        "The run's own checkpoints/epoch_latest.pt, when present, wins (re-running resumes).",
    )
    g.add_argument("--no-auto-resume", action="store_true", help="Ignore the run's own epoch_latest.pt.")
    g.add_argument(
        "--allow-changed-flags",
        action="store_true",
        help="Resume the run's own epoch_latest.pt even where flags that change training (lr, batch size, "
        "steps, model, prompt, tuning, ...) differ from its params.json; without it such a re-run is "
        "refused, listing the differences.",
    )
    g.add_argument("--reset-optimizer", action="store_true", help="When resuming, start with a fresh optimizer.")
    g.add_argument("--reset-data-offset", action="store_true", help="When resuming, start at epoch 0, step 0.")
    g.add_argument("--clip-weight-path", default=None, help="cn_clip: OpenAI CLIP weights for the image tower.")
    g.add_argument("--bert-weight-path", default=None, help="cn_clip: BERT weights for the text tower.")
    g.add_argument("--mask-ratio", type=float, default=0.0, help="FLIP patch masking ratio for ViT (cn_clip).")
    g.add_argument("--grad-checkpointing", action="store_true", help="Recompute activations in backward.")
    g.add_argument("--use-flash-attention", action="store_true", help="cn_clip flag; not supported here (refused).")
    g.add_argument(
        "--attn-impl",
        choices=ATTN_IMPLS,
        default="sdpa",
        help="text-tower attention: sdpa (fused scaled_dot_product_attention, the default) or upstream "
        "(cn_clip's own; equal within float rounding, to compare)",
    )
    g.add_argument("--use-bn-sync", action="store_true", help="SyncBatchNorm under DDP (ResNet).")
    g.add_argument(
        "--torchcompile",
        action="store_true",
        help="torch.compile the towers' blocks (open_clip's flag; inductor: a C++ compiler on CPU, triton on CUDA); "
        "compile time is logged (compile_s in metrics.jsonl) and left out of step times. Refused "
        "with LoRA on the ViT's attention (nn.MultiheadAttention)",
    )
    g.add_argument(
        "--torchcompile-backend", choices=COMPILE_BACKENDS, default="inductor", help=argparse.SUPPRESS
    )  # tests: aot_eager/eager capture graphs without building kernels

    g = p.add_argument_group("tuning")
    g.add_argument("--freeze-vision", action="store_true", help="No gradient for the image tower (cn_clip).")
    g.add_argument("--freeze-text", action="store_true", help="No gradient for the text tower (new).")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on both towers; 0 = full fine-tuning.")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha, > 0 (default 2 x rank).")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout, in [0, 1).")
    g.add_argument(
        "--lora-targets",
        default=None,
        help=r"Regex of module names to adapt (default ViT attention + BERT query/key/value: .*\.(attn|query|key|value)$).",
    )

    g = p.add_argument_group("optimisation (cn_clip flags)")
    g.add_argument("--batch-size", type=int, default=64, help="Batch size per process.")
    g.add_argument("--valid-batch-size", type=int, default=64, help="Validation batch size per process.")
    g.add_argument("--max-steps", type=int, default=None, help="Steps to train (wins over --max-epochs).")
    g.add_argument("--max-epochs", type=int, default=32)
    g.add_argument("--valid-step-interval", type=int, default=None, help="Validate every N steps.")
    g.add_argument("--valid-epoch-interval", type=int, default=1, help="Validate every N epochs (0 disables).")
    g.add_argument("--lr", type=float, default=None, help="Learning rate (default per vision model as cn_clip).")
    g.add_argument("--beta1", type=float, default=None)
    g.add_argument("--beta2", type=float, default=None)
    g.add_argument("--eps", type=float, default=None)
    g.add_argument("--wd", type=float, default=0.2, help="Weight decay (none on biases, norms, logit_scale).")
    g.add_argument("--warmup", type=int, default=500, help="Linear warmup steps, then cosine decay.")
    g.add_argument("--skip-scheduler", action="store_true", help="Constant learning rate.")
    g.add_argument(
        "--accum-freq", type=int, default=1, help="Feature-caching gradient accumulation (cn_clip semantics)."
    )
    g.add_argument(
        "--precision",
        type=precision_flag,
        choices=PRECISIONS,
        default="amp",
        metavar=PRECISION_METAVAR,
        help="amp/fp16: float16 autocast + GradScaler on CUDA (fp32 on CPU); bf16 (or open_clip's amp_bf16): "
        "bfloat16 autocast, no GradScaler; fp32.",
    )
    g.add_argument(
        "--same-text-positives",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Pairs whose texts share a text_id in the global batch are not each other's negatives "
        "(left out of the softmax denominators). On by default.",
    )
    g.add_argument(
        "--early-stop-patience",
        type=int,
        default=None,
        help="Stop when the main set's mean recall has not improved for N validations.",
    )
    g.add_argument("--seed", type=int, default=123)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun picks cuda:LOCAL_RANK).")

    g = p.add_argument_group("accepted for compatibility with cn_clip")
    g.add_argument(
        "--gather-with-grad", action="store_true", help="Always on here: features are gathered with gradient."
    )
    g.add_argument("--skip-aggregate", action="store_true", help="Contrast only within each process's batch.")
    g.add_argument("--debug", action="store_true", help="Debug logging.")
    g.add_argument("--distillation", action="store_true", help="Not supported (refused).")
    g.add_argument("--teacher-model-name", default=None)
    g.add_argument("--kd_loss_weight", "--kd-loss-weight", type=float, default=0.5)
    return p


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    p = Path(path)
    data = read_yaml_mapping(p, "config file")
    dests = {a.dest: a for a in parser._actions}
    out = {}
    for key, val in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in dests or dest in ("help", "config"):
            raise SolutionError(f"{p}: unknown key {key!r} (keys are training flag names, e.g. batch-size)")
        action = dests[dest]
        if val is None:  # null: the flag's default
            out[dest] = action.default
            continue
        if action.nargs == "*" and isinstance(val, dict):
            val = [f"{k}={v}" for k, v in val.items()]
        elif action.nargs == "*" and isinstance(val, str):
            val = [val]
        elif action.type is not None and val is not None and not isinstance(val, bool):
            try:
                val = action.type(val)
            except (TypeError, ValueError):
                raise SolutionError(f"{p}: {key} = {val!r} is not a valid {action.type.__name__}") from None
        if action.choices and val is not None and val not in action.choices:
            raise SolutionError(f"{p}: {key} = {val!r}; choose from {', '.join(map(str, action.choices))}")
        out[dest] = val
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags as typed (command line over config file over defaults), checked; nothing derived."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    from_config = {}
    if pre.config:
        from_config = _read_config(pre.config, parser)
        parser.set_defaults(**from_config)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage line
        if e.code == 0:
            raise
        raise SolutionError("invalid command line (see the usage message above)") from None
    try:
        check_flags(args)
        return args
    except SolutionError as e:  # a value the config file gave: name the file
        flag = str(e).split(" ", 1)[0]
        dest = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if dest in from_config and not any(a.startswith(flag) for a in (argv if argv is not None else sys.argv[1:])):
            raise SolutionError(f"{pre.config}: {e}") from None
        raise


def check_flags(args: argparse.Namespace) -> None:
    """Checks that need neither the data nor the model (``args`` is left as typed)."""
    if not args.train_data:
        raise SolutionError("--train-data is required (an LMDB directory with imgs/ and pairs/)")
    if args.use_flash_attention:
        raise SolutionError("--use-flash-attention is not supported by this trainer (PyTorch SDPA is used instead)")
    if args.distillation:
        raise SolutionError("--distillation is not supported by this trainer")
    _check_ranges(args)
    check_name(args.name)
    extra_val_sets(args.extra_val_data)


def extra_val_sets(items: Sequence[str] | None) -> dict[str, str]:
    """``--extra-val-data NAME=LMDB ...`` as ``{name: path}`` (one clear error for a malformed item)."""
    extra: dict[str, str] = {}
    for item in items or []:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise SolutionError(f"--extra-val-data expects NAME=LMDB, got {item!r}")
        if name == MAIN_SET or name in extra:
            raise SolutionError(f"--extra-val-data: duplicate set name {name!r}")
        extra[name] = path
    return extra


def _check_ranges(args: argparse.Namespace) -> None:
    """Every number in its range (one line naming the flag): nothing silently reinterpreted."""

    def bad(flag: str, what: str) -> None:
        raise SolutionError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is out of range: {what}")

    def number(flag: str) -> float | None:
        v = getattr(args, flag)
        if v is not None and not math.isfinite(v):
            bad(flag, "must be a finite number")
        return v

    for flag in (
        "batch_size",
        "valid_batch_size",
        "accum_freq",
        "log_interval",
        "max_epochs",
        "context_length",
        "max_steps",
        "valid_step_interval",
        "early_stop_patience",
    ):
        v = getattr(args, flag)
        if v is None and flag in ("context_length", "max_steps", "valid_step_interval", "early_stop_patience"):
            continue  # not given: inherited, derived or off
        if v is None or v < 1:
            bad(flag, "must be a positive integer")
    for flag in ("num_workers", "valid_num_workers", "warmup", "valid_epoch_interval", "lora_rank"):
        if getattr(args, flag) < 0:
            bad(flag, "must be 0 or more" + (" (0 = full fine-tuning)" if flag == "lora_rank" else ""))
    if not 0 <= args.seed < 2**31:
        bad("seed", "must be in [0, 2^31)")
    for flag in ("lr", "wd"):
        v = number(flag)
        if v is not None and v < 0:
            bad(flag, "must be 0 or more")
    for flag in ("beta1", "beta2"):
        v = number(flag)
        if v is not None and not 0 <= v < 1:
            bad(flag, "must be in [0, 1)")
    for flag in ("eps", "lora_alpha"):
        v = number(flag)
        if v is not None and v <= 0:
            bad(flag, "must be greater than 0")
    for flag in ("lora_dropout", "mask_ratio"):
        if not 0.0 <= number(flag) < 1.0:
            bad(flag, "must be in [0, 1)")
    if args.lora_targets is not None:
        try:
            re.compile(args.lora_targets)
        except re.error as e:
            raise SolutionError(
                f"--lora-targets {args.lora_targets!r} is not a valid regular expression ({e})"
            ) from None


def check_name(name: str) -> None:
    """``--name`` is a relative path that stays inside ``--logs`` (subfolders allowed)."""
    norm = os.path.normpath(name) if name else ""
    if not name or "\0" in name or os.path.isabs(name) or norm in (".", "..") or norm.startswith(".." + os.sep):
        raise SolutionError(
            f"--name {name!r} leaves --logs: give a run folder name inside it (e.g. exp1 or "
            "exp/run1), no absolute path and no '..' that climbs out"
        )

"""Search config: the YAML file (described in :mod:`solution.search`) with the command line's settings, the
parameter space, and a trial's flags for ``train_clip.sh``, checked by the trainer's own parser."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from solution.common import SolutionError, read_yaml_mapping

from .gpus import check_gpu_settings

log = logging.getLogger(__name__)

DEFAULT_OUT = "runs/search"  # a config without out: keeps its study in runs/search/NAME
RESERVED_FLAGS = {"logs", "name"}  # set per trial by the search
PARAM_TYPES = ("float", "int", "categorical")
CHOICES = {
    "direction": ("maximize",),  # the objective is mean recall, and best.pt keeps its maximum
    "mode": ("inprocess", "subprocess"),
    "report_at": ("step", "epoch"),
    "plots": ("each", "end", True, False),
    "pruner": ("median", "hyperband", "none"),
    "sampler": ("tpe", "random"),
}
# integer settings, least value
COUNTS = {"n_trials": 0, "torchrun_nproc": 0, "heartbeat": 0, "grace_period": 1, "gpus_per_trial": 0}


def flag_key(name: str) -> str:
    """``--batch_size`` / ``batch_size`` / ``batch-size`` -> ``batch-size``."""
    return str(name).lstrip("-").replace("_", "-")


@dataclass
class ParamSpec:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    only_if: str | None = None
    sets: dict | None = None  # choice -> {flag: value}: the param is not a flag itself

    @classmethod
    def parse(cls, name: str, spec: Any) -> ParamSpec:
        spec = {"type": "categorical", "choices": spec} if isinstance(spec, list) else spec
        where = f"search space entry {name!r}"
        if not isinstance(spec, dict):
            raise SolutionError(f"{where} must be a mapping or a list of choices")
        unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(cls)} | ({"name"} & set(spec)))
        if unknown:
            raise SolutionError(f"{where}: unknown keys {unknown}")
        kind = spec.get("type", "categorical" if "choices" in spec else None)
        if kind not in PARAM_TYPES:
            raise SolutionError(f"{where}: type must be one of {PARAM_TYPES}, got {kind!r}")
        p = cls(**{**spec, "name": flag_key(name), "type": kind, "log": bool(spec.get("log", False))})
        p.only_if = p.only_if and flag_key(p.only_if)
        problem = p._bad_choices() if kind == "categorical" else p._bad_range()
        if problem:
            raise SolutionError(f"{where}: {problem}")
        p.sets = p.sets and {k: {flag_key(f): v for f, v in fl.items()} for k, fl in p.sets.items()}
        return p

    def _bad_choices(self) -> str | None:
        if not isinstance(self.choices, list) or not self.choices:
            return "categorical needs a non-empty choices list"
        bad = [c for c in self.choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            return f"choices must be scalars or null, got {bad[0]!r}"
        sets_ok = isinstance(self.sets, dict) and all(isinstance(v, dict) for v in self.sets.values())
        if self.sets is not None and not sets_ok:
            return "sets must map choices to flag mappings"
        stray = [k for k in self.sets or {} if k not in self.choices]
        return f"sets names {stray[0]!r}, which is not a choice" if stray else None

    def _bad_range(self) -> str | None:
        try:
            self.low, self.high = (int(float(x)) if self.type == "int" else float(x) for x in (self.low, self.high))
        except (TypeError, ValueError):
            return f"{self.type} needs numeric low and high"
        if not self.low < self.high or not math.isfinite(self.high - self.low):
            return "low must be below high (both finite)"
        if self.log and self.low <= 0:
            return "a log range needs low > 0"
        if self.step is not None and (not _number(self.step) or self.step <= 0):
            return f"step must be a positive number, got {self.step!r}"
        if self.log and self.step is not None and not (self.type == "int" and self.step == 1):
            return "log and step cannot be combined"

    def suggest(self, trial: optuna.Trial):
        if self.type == "float":
            step = None if self.step is None else float(self.step)
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, self.choices)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SearchConfig:
    base: dict
    space: dict[str, ParamSpec]
    name: str = "search"
    direction: str = "maximize"
    n_trials: int = 10
    out: str | None = None  # None: DEFAULT_OUT
    storage: str | None = None
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    mode: str = "inprocess"
    torchrun_nproc: int = 0
    timeout: float | None = None
    report_at: str = "step"
    enqueue: list = field(default_factory=list)
    launcher: list | None = None
    heartbeat: int = 60  # seconds between a running trial's heartbeats in an RDB storage; 0: none
    grace_period: int | None = None  # seconds without heartbeat before a trial is dead; None: 3 x heartbeat
    plots: bool | str = "each"  # each (after every trial) | end | false
    gpus_per_trial: int = 0  # >0: each trial leases its own GPUs (studies/gpus.py)
    gpus: Any = None  # the GPUs a worker may lease ("0,1,2,3" or a list); None: CUDA_VISIBLE_DEVICES / all
    gpu_lease_dir: str | None = None  # the node's lease folder; None: {tmp}/solution-gpu-leases-{uid}
    source: str = "config"  # the file it came from, for messages
    overrides: dict = field(default_factory=dict)  # base flag -> its --set FLAG=VALUE

    @property
    def study_dir(self) -> Path:
        return Path(self.out or DEFAULT_OUT) / self.name


STUDY_KEYS = {f.name for f in dataclasses.fields(SearchConfig)} - {"base", "space", "source", "overrides"}


def parse_config(raw: dict, source: str = "config") -> SearchConfig:
    settings = {k: v for k, v in raw.items() if k in STUDY_KEYS}
    base, space = raw.get("base") or {}, raw.get("space") or {}
    unknown, allowed = sorted(set(raw) - STUDY_KEYS - {"base", "space"}), ", ".join(sorted(STUDY_KEYS))
    if unknown:
        raise SolutionError(f"{source}: unknown keys {unknown} (allowed: base, space, {allowed})")
    if not isinstance(base, dict) or not isinstance(space, dict):
        raise SolutionError(f"{source}: 'base' and 'space' must be mappings")
    specs = {p.name: p for p in (ParamSpec.parse(name, spec) for name, spec in space.items())}
    for p in specs.values():
        if p.name in RESERVED_FLAGS:
            raise SolutionError(f"{source}: --{p.name} is set by the search for each trial, it cannot be searched")
        if p.only_if and p.only_if not in specs:
            raise SolutionError(f"{source}: {p.name}.only_if names {p.only_if!r}, which is not in the space")
    for key, default in (("pruner", "median"), ("sampler", "tpe")):  # a name, or a mapping with a name
        value = settings.get(key, default)
        if not (value is None or isinstance(value, str) or (isinstance(value, dict) and "name" in value)):
            raise SolutionError(f"{source}: {key} must be a name or a mapping with a 'name' key")
        settings[key] = dict(value) if isinstance(value, dict) else {"name": value or "none"}
    cfg = SearchConfig(base={flag_key(k): v for k, v in base.items()}, space=specs, source=source, **settings)
    _check(cfg, source)
    for k in RESERVED_FLAGS & set(cfg.base):
        log.warning("base flag --%s is replaced by the search for each trial (kept for best_command.sh)", k)
    for k in set(cfg.base) & {p.name for p in specs.values() if p.sets is None}:
        log.warning("base flag --%s is searched: each trial's value replaces %r", k, cfg.base[k])
    return cfg


def _check(cfg: SearchConfig, source: str) -> None:
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        value = value["name"] if isinstance(value, dict) else value
        if value not in allowed:
            raise SolutionError(f"{source}: {key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    if not isinstance(cfg.name, str) or cfg.name in ("", ".", "..") or "/" in cfg.name:
        raise SolutionError(f"{source}: name must be a plain folder name, got {cfg.name!r}")
    if cfg.out is not None and not isinstance(cfg.out, (str, os.PathLike)):
        raise SolutionError(f"{source}: out must be a folder path, got {cfg.out!r}")
    for key, least in COUNTS.items():
        value = getattr(cfg, key)
        if (value is not None or key != "grace_period") and (type(value) is not int or value < least):
            raise SolutionError(f"{source}: {key} must be an integer >= {least}, got {value!r}")
    if cfg.grace_period is not None and cfg.grace_period <= cfg.heartbeat:
        raise SolutionError(f"{source}: grace_period ({cfg.grace_period} s) must exceed heartbeat ({cfg.heartbeat} s)")
    if cfg.timeout is not None and not (_number(cfg.timeout) and cfg.timeout > 0):
        raise SolutionError(f"{source}: timeout must be a positive number of seconds, got {cfg.timeout!r}")
    if cfg.launcher is not None and (not isinstance(cfg.launcher, list) or not cfg.launcher):
        raise SolutionError(f"{source}: launcher must be a non-empty list, e.g. [bash, Chinese-CLIP/train_clip.sh]")
    if not isinstance(cfg.enqueue, list) or not all(isinstance(e, dict) for e in cfg.enqueue):
        raise SolutionError(f"{source}: enqueue must be a list of parameter mappings")
    for i, params in enumerate(cfg.enqueue):
        stray = [k for k in params if flag_key(k) not in cfg.space]
        if stray:
            space = ", ".join(cfg.space) or "empty"
            raise SolutionError(f"{source}: enqueue[{i}] names {stray[0]!r}, which is not in the space ({space})")
    check_gpu_settings(cfg, source)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), pruner=None, **study) -> SearchConfig:
    """The YAML config, ``--set FLAG=VALUE`` over its base flags (``FLAG=`` drops one) and the command line's
    ``study`` settings where given (a ``pruner`` other than the config's comes with its defaults)."""
    raw = read_yaml_mapping(Path(path), "search config")
    keys = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SolutionError(f"--set expects FLAG=VALUE, got {item!r}")
        raw["base"] = raw["base"] if isinstance(raw.get("base"), dict) else {}
        keys[flag_key(key.strip())] = item
        try:
            raw["base"][flag_key(key.strip())] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            raise SolutionError(f"--set {item}: the value is not valid YAML") from None
    raw.update({k: v for k, v in study.items() if v is not None})
    if study.get("torchrun_nproc"):
        raw["mode"] = "subprocess"
    cfg = parse_config(raw, str(path))
    cfg.pruner = {"name": pruner} if pruner and pruner != cfg.pruner["name"] else cfg.pruner
    cfg.overrides = keys
    return cfg


def suggest_params(trial: optuna.Trial | None, space: dict[str, ParamSpec], pick=None) -> dict:
    params: dict = {}
    for p in space.values():
        if not p.only_if or params.get(p.only_if):  # a conditional parameter whose parent is on
            params[p.name] = pick(p) if pick else p.suggest(trial)  # pick: instead of the trial
    return params


def trial_flags(cfg: SearchConfig, params: dict) -> dict:
    """Base flags updated by a trial's parameters (``sets`` choices expand into their flags)."""
    flags = dict(cfg.base)
    for name, value in params.items():
        sets = getattr(cfg.space.get(name), "sets", None)
        flags.update(sets.get(value, {}) if sets is not None else {flag_key(name): value})
    return flags


def flags_to_argv(flags: dict) -> list[str]:
    """``{"lr": 1e-5, "freeze-vision": True, "text-prompt": None}`` -> ``["--lr", "1e-05", "--freeze-vision"]``;
    ``False`` for a trainer switch that is on by default -> ``--no-KEY``."""
    from solution.training.flags import FLAGS

    argv: list[str] = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            f = FLAGS.get(key.replace("-", "_"))
            argv += [f"--no-{key}"] if f is not None and f.parse is bool and f.default else []
        elif value is not None:
            argv += [f"--{key}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return argv


def check_trial_flags(cfg: SearchConfig) -> None:
    """Refuse a config whose trials ``solution.train`` would not start: every flag name must be the trainer's, and
    the first trial, each enqueued one and each choice and range end of the space must pass its parser."""
    from solution.training.flags import FLAGS, FlagError, parse_args

    known = {name[2:] for f in FLAGS.values() for name in (f.name, *f.aliases)}
    names = [(k, f"--set {cfg.overrides[k]}" if k in cfg.overrides else f"base key {k!r}") for k in cfg.base]
    for p in cfg.space.values():
        names += [(p.name, f"space entry {p.name!r}")] if p.sets is None else []
        names += [(k, f"space entry {p.name!r}, sets.{c}") for c, fl in (p.sets or {}).items() for k in fl]
    for key, where in names:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise SolutionError(f"{cfg.source}: {where}: --{key} is not a flag of solution.train{hint}")
    for label, params in _probe_trials(cfg):
        try:
            parse_args(flags_to_argv({**trial_flags(cfg, params), "logs": "logs", "name": "trial"}))
        except FlagError as e:
            raise SolutionError(f"{cfg.source}: {label} cannot start: {e}") from None


def _fill(cfg: SearchConfig, fixed: dict) -> dict:
    """A trial's parameters: ``fixed`` where given, else each range's low end or first choice."""
    return suggest_params(
        None, cfg.space, lambda p: fixed.get(p.name, p.choices[0] if p.type == "categorical" else p.low)
    )


def _probe_trials(cfg: SearchConfig):
    for i, params in enumerate(cfg.enqueue or [{}]):
        yield f"enqueue[{i}]" if i else "the first trial", _fill(cfg, {flag_key(k): v for k, v in params.items()})
    for p in cfg.space.values():
        parents, q = {}, p
        while q.only_if:  # switch the parents on with their first truthy value
            q = cfg.space[q.only_if]
            parents[q.name] = next((c for c in q.choices if c), None) if q.type == "categorical" else q.high
        for value in p.choices if p.type == "categorical" else (p.low, p.high):
            yield f"space entry {p.name!r} = {value!r}", _fill(cfg, {**parents, p.name: value})

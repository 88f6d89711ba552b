"""Search config: the YAML file (described in :mod:`solution.search`), command-line overrides, the
parameter space, and a trial's flags as ``train_clip.sh`` flags (``true`` -> ``--flag``,
``false``/``null`` -> omitted, a list -> ``--flag a b``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
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
        unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
        if unknown or "name" in spec:
            raise SolutionError(f"{where}: unknown keys {sorted(unknown | ({'name'} & set(spec)))}")
        kind = spec.get("type", "categorical" if "choices" in spec else None)
        if kind not in PARAM_TYPES:
            raise SolutionError(f"{where}: type must be one of {PARAM_TYPES}, got {kind!r}")
        p = cls(**{**spec, "name": flag_key(name), "type": kind, "log": bool(spec.get("log", False))})
        p.only_if = p.only_if and flag_key(p.only_if)
        if kind == "categorical":
            if not isinstance(p.choices, list) or not p.choices:
                raise SolutionError(f"{where}: categorical needs a non-empty choices list")
            bad = [c for c in p.choices if c is not None and not isinstance(c, (bool, int, float, str))]
            if bad:
                raise SolutionError(f"{where}: choices must be scalars or null, got {bad[0]!r}")
            if p.sets is not None and (
                not isinstance(p.sets, dict) or not all(isinstance(v, dict) for v in p.sets.values())
            ):
                raise SolutionError(f"{where}: sets must map choices to flag mappings")
            stray = [k for k in p.sets or {} if k not in p.choices]
            if stray:
                raise SolutionError(f"{where}: sets names {stray[0]!r}, which is not a choice")
            p.sets = p.sets and {k: {flag_key(f): v for f, v in fl.items()} for k, fl in p.sets.items()}
            return p
        try:
            p.low, p.high = (int(float(x)) if kind == "int" else float(x) for x in (p.low, p.high))
        except (TypeError, ValueError):
            raise SolutionError(f"{where}: {kind} needs numeric low and high") from None
        if not p.low < p.high:
            raise SolutionError(f"{where}: low must be below high")
        if p.log and p.low <= 0:
            raise SolutionError(f"{where}: a log range needs low > 0")
        if p.log and p.step is not None and not (kind == "int" and p.step == 1):
            raise SolutionError(f"{where}: log and step cannot be combined")
        return p

    def suggest(self, trial: optuna.Trial):
        if self.type == "float":
            step = None if self.step is None else float(self.step)
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, self.choices)


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
    metric: str = "mean_recall"
    valid_set: str = "valid"
    enqueue: list = field(default_factory=list)
    launcher: list | None = None
    heartbeat: int = 60  # seconds between a running trial's heartbeats in an RDB storage; 0: none
    grace_period: int | None = None  # seconds without heartbeat before a trial is dead; None: 3 x heartbeat
    plots: bool | str = "each"  # each (after every trial) | end | false
    retry_interrupted: bool = True
    gpus_per_trial: int = 0  # >0: each trial leases its own GPUs (studies/gpus.py)
    gpus: Any = None  # the GPUs a worker may lease ("0,1,2,3" or a list); None: CUDA_VISIBLE_DEVICES / all
    gpu_lease_dir: str | None = None  # the node's lease folder; None: {tmp}/solution-gpu-leases-{uid}
    source: str = "config"  # the file it came from, for messages
    overrides: dict = field(default_factory=dict)  # base flag -> its --set FLAG=VALUE

    @property
    def study_dir(self) -> Path:
        return Path(self.out or DEFAULT_OUT) / self.name


STUDY_KEYS = {f.name for f in dataclasses.fields(SearchConfig)} - {"base", "space", "source", "overrides"}


def _named(value: Any, what: str) -> dict:
    """``median`` or ``{name: median, ...}`` -> ``{"name": "median", ...}``."""
    if value is None or isinstance(value, str):
        return {"name": value or "none"}
    if isinstance(value, dict) and "name" in value:
        return dict(value)
    raise SolutionError(f"{what} must be a name or a mapping with a 'name' key")


def parse_config(raw: dict, source: str = "config") -> SearchConfig:
    if not isinstance(raw, dict):
        raise SolutionError(f"{source}: expected a YAML mapping at the top level")
    raw = dict(raw)
    study = raw.pop("study", None) or {}
    if not isinstance(study, dict):
        raise SolutionError(f"{source}: 'study' must be a mapping")
    settings = {**study, **{k: raw.pop(k) for k in list(raw) if k in STUDY_KEYS}}
    base, space = raw.pop("base", None) or {}, raw.pop("space", None) or {}
    unknown = sorted({*raw, *(set(study) - STUDY_KEYS)})
    if unknown:
        allowed = ", ".join(sorted(STUDY_KEYS))
        raise SolutionError(f"{source}: unknown keys {unknown} (allowed: base, space, study, {allowed})")
    if not isinstance(base, dict) or not isinstance(space, dict):
        raise SolutionError(f"{source}: 'base' and 'space' must be mappings")
    specs = {p.name: p for p in (ParamSpec.parse(name, spec) for name, spec in space.items())}
    for p in specs.values():
        if p.name in RESERVED_FLAGS:
            raise SolutionError(f"{source}: --{p.name} is set by the search for each trial, it cannot be searched")
        if p.only_if and p.only_if not in specs:
            raise SolutionError(f"{source}: {p.name}.only_if names {p.only_if!r}, which is not in the space")
    settings["pruner"] = _named(settings.get("pruner", "median"), "pruner")
    settings["sampler"] = _named(settings.get("sampler", "tpe"), "sampler")
    cfg = SearchConfig(base={flag_key(k): v for k, v in base.items()}, space=specs, source=source, **settings)
    check_config(cfg, source)
    for k in RESERVED_FLAGS & set(cfg.base):
        log.warning("base flag --%s is replaced by the search for each trial (kept for best_command.sh)", k)
    for k in set(cfg.base) & {p.name for p in specs.values() if p.sets is None}:
        log.warning("base flag --%s is searched: each trial's value replaces %r", k, cfg.base[k])
    return cfg


def check_config(cfg: SearchConfig, source: str = "config") -> None:
    choices = {
        "direction": ("maximize", "minimize"),
        "mode": ("inprocess", "subprocess"),
        "report_at": ("step", "epoch"),
    }
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SolutionError(f"{source}: {key} must be {' or '.join(map(str, allowed))}, got {getattr(cfg, key)!r}")
    if cfg.plots not in (True, False, "each", "end"):
        raise SolutionError(f"{source}: plots must be each, end or false, got {cfg.plots!r}")
    if cfg.pruner["name"] not in ("median", "hyperband", "none"):
        raise SolutionError(f"{source}: pruner must be median, hyperband or none, got {cfg.pruner['name']!r}")
    if cfg.sampler["name"] not in ("tpe", "random"):
        raise SolutionError(f"{source}: sampler must be tpe or random, got {cfg.sampler['name']!r}")
    if not isinstance(cfg.name, str) or cfg.name in ("", ".", "..") or "/" in cfg.name:
        raise SolutionError(f"{source}: name must be a plain folder name, got {cfg.name!r}")
    if cfg.out is not None and not isinstance(cfg.out, (str, os.PathLike)):
        raise SolutionError(f"{source}: out must be a folder path, got {cfg.out!r}")
    for key, least in (("n_trials", 0), ("torchrun_nproc", 0), ("heartbeat", 0), ("grace_period", 1)):
        value = getattr(cfg, key)
        if (value is not None or key != "grace_period") and (type(value) is not int or value < least):
            what = "a positive" if least else "a non-negative"
            raise SolutionError(f"{source}: {key} must be {what} integer, got {value!r}")
    if cfg.grace_period is not None and cfg.grace_period <= cfg.heartbeat:
        raise SolutionError(f"{source}: grace_period ({cfg.grace_period} s) must exceed heartbeat ({cfg.heartbeat} s)")
    if cfg.timeout is not None and not isinstance(cfg.timeout, (int, float)):
        raise SolutionError(f"{source}: timeout must be a number of seconds, got {cfg.timeout!r}")
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


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> SearchConfig:
    """The YAML config with ``--set FLAG=VALUE`` overrides of its base flags (the value read as YAML;
    ``FLAG=`` or ``FLAG=null`` drops a base flag)."""
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
    cfg = parse_config(raw, str(path))
    cfg.overrides = keys
    return cfg


def override(cfg: SearchConfig, source: str, *, study_name=None, pruner=None, no_plots=False, **values) -> SearchConfig:
    """The command line's study settings over the config's: ``values`` (study settings) where not None;
    torchrun implies subprocess mode; a pruner named other than the config's replaces it with its
    defaults. Checked again as a whole."""
    for key, value in values.items():
        if key not in STUDY_KEYS:
            raise SolutionError(f"{source}: {key} is not a study setting")
        if value is not None:
            setattr(cfg, key, value)
    cfg.name = study_name or cfg.name
    cfg.mode = "subprocess" if values.get("torchrun_nproc") else cfg.mode
    if pruner and pruner != cfg.pruner["name"]:
        cfg.pruner = {"name": pruner}
    cfg.plots = False if no_plots else cfg.plots
    check_config(cfg, source)
    return cfg


def suggest_params(trial: optuna.Trial, space: dict[str, ParamSpec]) -> dict:
    params: dict = {}
    for p in space.values():
        if not p.only_if or params.get(p.only_if):  # a conditional parameter whose parent is on
            params[p.name] = p.suggest(trial)
    return params


def trial_flags(cfg: SearchConfig, params: dict) -> dict:
    """Base flags updated by a trial's parameters (``sets`` choices expand into their flags)."""
    flags = dict(cfg.base)
    for name, value in params.items():
        spec = cfg.space.get(name)
        flags.update(
            spec.sets.get(value, {}) if spec is not None and spec.sets is not None else {flag_key(name): value}
        )
    return flags


def flags_to_argv(flags: dict) -> list[str]:
    """``{"lr": 1e-5, "freeze-vision": True, "text-prompt": None}`` -> ``["--lr", "1e-05", "--freeze-vision"]``."""
    argv: list[str] = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return argv


# ---------------------------------------------------------------- trials the trainer would refuse


def check_trial_flags(cfg: SearchConfig) -> None:
    """Refuse, before the first trial, a config whose trials ``solution.train`` would not start.

    Every flag name (base, ``--set``, space, ``sets``) must be a trainer flag, and the command line of
    the first trial, of each enqueued trial and of each choice and range end of the space must pass the
    trainer's own parser (without training). A failure is one line naming the file, key and problem.
    """
    from solution.training.flags import FLAGS

    known = {name[2:] for f in FLAGS.values() for name in (f.name, *f.aliases)}
    names = [(k, f"--set {cfg.overrides[k]}" if k in cfg.overrides else f"base key {k!r}") for k in cfg.base]
    for p in cfg.space.values():
        if p.sets is None:
            names.append((p.name, f"space entry {p.name!r}"))
        names += [(k, f"space entry {p.name!r}, sets.{c}") for c, fl in (p.sets or {}).items() for k in fl]
    for key, where in names:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise SolutionError(f"{cfg.source}: {where}: --{key} is not a flag of solution.train{hint}")
    for label, params in _probe_trials(cfg):
        error = _trainer_refusal(flags_to_argv({**trial_flags(cfg, params), "logs": "logs", "name": "trial"}))
        if error:
            raise SolutionError(f"{cfg.source}: {label} cannot start: {error}")


def _fill(cfg: SearchConfig, fixed: dict) -> dict:
    """A trial's parameters: ``fixed`` where given, else each range's low end or first choice."""
    params: dict = {}
    for p in cfg.space.values():
        if p.only_if and not params.get(p.only_if):
            continue
        params[p.name] = fixed[p.name] if p.name in fixed else (p.choices[0] if p.type == "categorical" else p.low)
    return params


def _probe_trials(cfg: SearchConfig):
    yield "the first trial", _fill(cfg, {flag_key(k): v for k, v in (cfg.enqueue[:1] or [{}])[0].items()})
    for i, params in enumerate(cfg.enqueue[1:], 1):
        yield f"enqueue[{i}]", _fill(cfg, {flag_key(k): v for k, v in params.items()})
    for p in cfg.space.values():
        parents, q = {}, p
        while q.only_if:  # switch the parents on with their first truthy value
            q = cfg.space[q.only_if]
            parents[q.name] = next((c for c in q.choices if c), None) if q.type == "categorical" else q.high
        for value in p.choices if p.type == "categorical" else (p.low, p.high):
            yield f"space entry {p.name!r} = {value!r}", _fill(cfg, {**parents, p.name: value})


def _trainer_refusal(argv: list[str]) -> str | None:
    """The trainer parser's one-line refusal of ``argv``, or None when it accepts it."""
    from solution.training.flags import FlagError, parse_args

    try:
        parse_args(argv)
    except FlagError as e:
        return str(e)
    return None

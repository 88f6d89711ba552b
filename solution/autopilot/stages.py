"""The pipeline's stages: each one is an existing command run in-process (``--dry-run`` shows its shell form),
talking to the others through the same files, and skipped or resumed when its output exists."""

from __future__ import annotations

import importlib
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from solution.common import SolutionError, atomic_path, read_yaml_mapping
from solution.formats.kinds import ENSEMBLE_SPEC
from solution.soups import SOUP, SUMMARY
from solution.studies.search_config import flags_to_argv

from .recipe import Model, Recipe

log = logging.getLogger(__name__)

TOOLS = {  # name -> (shell form, module whose main(argv) runs it)
    "prepare": ("python -m solution.prepare", "solution.prepare"),
    "train": ("bash Chinese-CLIP/train_clip.sh", "solution.train"),
    "search": ("bash scripts/search.sh", "solution.search"),
    "soup": ("bash Chinese-CLIP/model_soup.sh", "solution.soup"),
    "ensemble": ("bash Chinese-CLIP/ensemble.sh", "solution.ensemble"),
    "features": ("bash Chinese-CLIP/feature_extract.sh", "solution.features"),
    "predict": ("bash Chinese-CLIP/predict.sh", "solution.predict"),
    "inspect": ("python -m solution.inspect", "solution.inspect"),
}
SPLITS = ("train", "valid", "test")


class Stages:
    """Runs (or, dry, only prints) the commands a recipe stands for."""

    def __init__(self, recipe: Recipe, dry_run: bool = False):
        self.r, self.dry, self.out = recipe, dry_run, recipe.out
        self.commands: list[str] = []
        self._starts: dict[str, Path] = {}

    def call(self, stage: str, tool: str, argv: list, done: Path | None = None):
        shell, module = TOOLS[tool]
        argv = [str(a) for a in argv]
        torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", str(self.r.nproc), "-m", module]
        if tool == "train" and self.r.nproc > 1:
            shell = f"torchrun --nproc_per_node {self.r.nproc} -m {module}"
        self.commands.append(f"# {stage}\n{shell} {shlex.join(argv)}")
        if self.dry:
            return self._check(stage, module, argv)
        if done is not None and done.exists():
            log.info("[%s] done already (%s)", stage, done)
            return None
        log.info("[%s] %s %s", stage, shell, shlex.join(argv))
        if tool == "train" and self.r.nproc > 1:  # one process per GPU: the run's own processes
            if subprocess.run([sys.executable, *torchrun, *argv]).returncode:
                raise SolutionError(f"{stage} failed under torchrun (see its log above)")
            return None
        return importlib.import_module(module).main(argv)

    def _check(self, stage: str, module: str, argv: list[str]) -> None:
        """The tool's own parser takes the stage's command (the trainer's is checked with the recipe)."""
        build = getattr(importlib.import_module(module), "build_parser", None)
        if build is not None:
            parser = build()

            def refuse(message):
                raise SolutionError(f"{self.r.where(f'the {stage} stage')}: {message}")

            parser.error = refuse
            parser.parse_args(argv)

    # ------------------------------------------------------------ data
    @property
    def data(self) -> Path:
        """The MUGE folder the LMDBs live in (a CSV recipe's is prepared under OUT/data)."""
        return self.out / "data" if self.r.data.suffix == ".csv" else self.r.data

    def lmdb(self, split: str, data: Path | None = None) -> Path:
        return (data or self.data) / "lmdb" / split

    def texts(self, split: str) -> Path:
        return self.data / f"{split}_texts.jsonl"

    def prepare(self) -> None:
        if self.r.data.suffix == ".csv":
            argv = ["--data-dir", self.data, "--csv", self.r.data, "--splits", "train", "--make-valid", "0.1"]
            self.call("prepare", "prepare", argv, done=self.lmdb("valid") / "pairs")
        folders = [self.data, *(self._folder(m.data) for m in self.r.starts.values() if m.data)]
        for folder in folders:
            splits = [s for s in SPLITS if (folder / f"{s}_imgs.tsv").is_file() or self.dry]
            missing = [s for s in splits if not (self.lmdb(s, folder) / "imgs").is_dir()]
            if missing:
                self.call(f"prepare {folder}", "prepare", ["--data-dir", folder, "--splits", ",".join(missing)])

    def _folder(self, data: str) -> Path:
        p = Path(data)
        return p if p.is_absolute() else self.data / p

    # ------------------------------------------------------------ training
    def start(self, name: str) -> Path:
        if name not in self._starts:
            m = self.r.starts[name]
            self._starts[name] = Path(m.checkpoint) if m.checkpoint else self.train(m)
        return self._starts[name]

    def train_argv(self, m: Model, resume: Path | None = None) -> list[str]:
        flags = {**self.r.train, **m.flags}
        data = self._folder(m.data) if m.data else self.data
        flags.setdefault("train-data", self.lmdb("train", data))
        flags.setdefault("val-data", self.lmdb("valid", data))
        flags.setdefault("device", self.r.device)
        flags.update({"logs": self.out / "runs", "name": m.name})
        if resume is not None:
            flags.update({"resume": resume, "reset-optimizer": True, "reset-data-offset": True})
        return flags_to_argv(flags)

    def train(self, m: Model) -> Path:
        resume = self.start(m.start) if m.start is not None else None
        self.call(f"train {m.name}", "train", self.train_argv(m, resume))
        return self.out / "runs" / m.name / "checkpoints" / "best.pt"

    def search_config(self, resume: Path | None) -> dict:
        """The recipe's search config, its base flags set to the task data, the device and the start."""
        s = self.r.search
        cfg = read_yaml_mapping(s["config"], "search config")
        base = {**(cfg.get("base") or {}), "train-data": str(self.lmdb("train")), "val-data": str(self.lmdb("valid"))}
        base["device"] = self.r.device
        if resume is not None:
            base.update({"resume": str(resume), "reset-optimizer": True, "reset-data-offset": True})
        sampler = cfg.get("sampler", "tpe")
        sampler = {"name": sampler} if isinstance(sampler, str) else sampler
        if isinstance(sampler, dict) and sampler.get("seed") is None:
            sampler = {**sampler, "seed": self.r.seed}  # a fresh run of the recipe samples the same trials
        gpus = int(s.get("gpus_per_trial") or 0)
        if gpus:  # the trial's own GPUs, all of them under torchrun when several
            cfg = {**cfg, "gpus_per_trial": gpus, "torchrun_nproc": gpus if gpus > 1 else 0}
        return {**cfg, "sampler": sampler, "base": {**base, **(s.get("set") or {})}}

    def search(self) -> Path:
        s, path = self.r.search, self.out / "search.yaml"
        cfg = self.search_config(self.start(s["start"]) if s.get("start") else None)
        if not self.dry:
            with atomic_path(path) as tmp:
                tmp.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
        argv = ["--config", path, "--out", self.out / "search", "--study-name", "study"]
        for key in ("n_trials", "storage"):
            if s.get(key) is not None:
                argv += [f"--{key.replace('_', '-')}", s[key]]
        self.call("search", "search", argv)
        return self.out / "search" / "study"

    # ------------------------------------------------------------ soups and ensembles
    def soups(self, singles: dict[str, Path], study: Path | None) -> dict[str, Path]:
        s, folder = self.r.soups, self.out / "soups"
        methods = list(s.get("methods") or ["greedy"])
        members = list(s.get("members") or [])
        listed = [singles[m] for m in members if m != "search"]
        argv = ["--checkpoints", *listed] if listed else []
        if "search" in members and study is not None:
            argv += ["--from-study", study, "--top", (self.r.search or {}).get("top", 4)]
        argv += ["--val-data", self.lmdb("valid"), "--method", ",".join(methods), "--folds", self.r.folds]
        argv += ["--seed", self.r.seed, "--output", folder, "--device", self.r.device]
        if s.get("interpolate_with"):
            base = s["interpolate_with"]
            argv += ["--interpolate-with", self.start(base) if base in self.r.starts else base]
            argv += ["--alphas", ",".join(map(str, s.get("alphas") or [0.25, 0.5, 0.75]))]
        self.call("soups", "soup", argv, done=folder / SUMMARY)
        return {f"soup-{m}": (folder / m if len(methods) > 1 else folder) / SOUP for m in methods}

    def ensemble(self, spec: dict, members: dict[str, Path]) -> Path:
        folder = self.out / "ensembles" / spec["name"]
        rerank = list(spec.get("rerank") or ["none"]) + (["flip"] if spec.get("flip") else [])
        argv = ["--members", *members.values(), "--val-data", self.lmdb("valid"), "--output", folder]
        argv += ["--folds", self.r.folds, "--seed", self.r.seed, "--norm", spec.get("norm", "zscore")]
        argv += ["--rerank", ",".join(rerank), "--device", self.r.device, "--cache-dir", self.out / "feature_cache"]
        if spec.get("bank", "train") and {"qb_norm", "dual_softmax"} & set(rerank):
            argv += ["--bank", self.texts(spec.get("bank", "train"))]
        self.call(f"ensemble {spec['name']}", "ensemble", argv, done=folder / ENSEMBLE_SPEC)
        return folder / ENSEMBLE_SPEC

    # ------------------------------------------------------------ predictions
    def predict(self, name: str, source: Path, output: Path) -> Path:
        """``output``: the top-10 test predictions of a checkpoint or an ensemble.json (kept when present)."""
        test = ["--text-data", self.texts("test")]
        common = ["--device", self.r.device, "--cache-dir", self.out / "feature_cache", "--no-progress"]
        if source.suffix == ".json":
            argv = ["--ensemble", source, "--image-data", self.lmdb("test"), *test, "--top-k", 10, "--output", output]
            self.call(f"predict {name}", "predict", argv + common, done=output)
            return output
        feats = self.out / "features" / name
        argv = ["--extract-image-feats", "--extract-text-feats", "--image-data", self.lmdb("test"), *test]
        argv += ["--resume", source, "--image-feat-output-path", feats / "test_imgs.npy"]
        argv += ["--text-feat-output-path", feats / "test_texts.npy", *common]
        self.call(f"features {name}", "features", argv, done=feats / "test_texts.npy")
        argv = ["--image-feats", feats / "test_imgs.npy", "--text-feats", feats / "test_texts.npy", "--top-k", 10]
        self.call(f"predict {name}", "predict", [*argv, "--output", output, "--no-progress"], done=output)
        return output


def soup_crossfit(folder: Path, method: str) -> dict:
    """A soup method's ``crossfit`` record (its summary.json), with the held-out hits file's path resolved."""
    path = folder / method / SUMMARY
    path = path if path.is_file() else folder / SUMMARY
    summary = json.loads(path.read_text(encoding="utf-8"))
    entry = summary.get("soups", {}).get(method) or {}
    cross = entry.get("crossfit")
    if not cross or not cross.get("hits"):
        raise SolutionError(f"{path}: the {method} soup has no cross-fitted held-out hits (run it with --folds)")
    return {**cross, "hits": path.parent / cross["hits"], "members": entry["members"], "weights": entry["weights"]}

"""The whole flow on the demo data, in one command (``bash scripts/demo.sh``).

Stages talk through files, exactly as a user's commands would, and each stage is skipped or
resumed when its output already exists, so a re-run reuses what is done:

    demo data -> prepare (cleaning) -> base model on "general" data (stands in for the
    pretrained weights) -> search (every trial fine-tunes from the base) + default, LoRA and
    frozen-image runs -> soups (uniform, greedy, pairwise) -> features -> predictions ->
    offline score -> runs/demo/REPORT.md with plots.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from solution.common import SolutionError, run_cli, write_json
from solution.soups.ingredients import study_checkpoints

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SUBMISSIONS = ROOT / "submissions"
TINY = ["--vision-model", "ViT-Tiny", "--text-model", "RBT-Tiny"]


class Demo:
    def __init__(self, out: Path, scale: str, device: str, search_trials: int):
        self.out, self.scale, self.device, self.search_trials = out, scale, device, search_trials
        self.data = out / "data"
        self.runs = out / "runs"
        self.s = SCALES[scale]
        self.t0 = time.time()

    def stage(self, name: str) -> None:
        log.info("=== [%5.0fs] %s", time.time() - self.t0, name)

    # ------------------------------------------------------------ data
    def make_data(self) -> None:
        from solution.data import synthetic as demo_data
        from solution.data import build as prepare

        self.stage("demo data")
        if not (self.data / "test_answers.jsonl").is_file():
            demo_data.generate(self.data, **self.s["data"])
        self.stage("prepare LMDBs (cleaning messy images)")
        if not (self.data / "lmdb" / "test" / "imgs" / "data.mdb").is_file():
            prepare.prepare(self.data, ["train", "valid", "test"])
        if not (self.data / "general" / "lmdb" / "valid" / "imgs" / "data.mdb").is_file():
            prepare.prepare(self.data / "general", ["train", "valid"])

    def lmdb(self, split: str, general: bool = False) -> str:
        return str((self.data / "general" if general else self.data) / "lmdb" / split)

    # ------------------------------------------------------------ training
    def train(self, name: str, extra: Sequence[str], general: bool = False) -> dict:
        from solution import train

        self.stage(f"train {name}")
        argv = [*TINY, "--train-data", self.lmdb("train", general), "--val-data", self.lmdb("valid", general),
                "--logs", str(self.runs), "--name", name, "--device", self.device, "--context-length", "32",
                "--num-workers", "0", "--valid-num-workers", "0", *self.s["train"], *extra]
        if not general:
            argv += ["--extra-val-data", f"general={self.lmdb('valid', True)}"]
        return train.main(argv)

    def finetune(self, name: str, extra: Sequence[str] = ()) -> dict:
        return self.train(name, ["--resume", str(self.base_ckpt), "--reset-optimizer", "--reset-data-offset",
                                 *self.s["finetune"], *extra])

    def search(self) -> Path:
        from solution import search

        self.stage(f"search ({self.search_trials} trials, each fine-tuning from the base)")
        cfg = yaml.safe_load((ROOT / "configs" / "search" / "demo-cpu.yaml").read_text(encoding="utf-8"))
        base = dict(cfg.get("base") or {})
        base.update({"train-data": self.lmdb("train"), "val-data": self.lmdb("valid"),
                     "resume": str(self.base_ckpt), "device": self.device, **self.s["trial"]})
        cfg["base"] = base
        # Soups average runs that share architecture, prompt and context length: the demo's trials
        # all use the base's (empty) prompt, so any of them can be souped with the others.
        cfg.get("space", {}).pop("text-prompt", None)
        for trial in cfg.get("enqueue") or []:
            trial.pop("text-prompt", None)
        path = self.out / "search.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
        search.main(["--config", str(path), "--out", str(self.out / "search"), "--study-name", "demo",
                     "--n-trials", str(self.search_trials)])
        return self.out / "search" / "demo"

    def soups(self, study: Path, extra_ckpts: Sequence[str]) -> Path:
        from solution import soup

        self.stage("soups (uniform, greedy, pairwise) from the search's trials and the fine-tuned runs")
        out = self.out / "soups"
        soup.main(["--from-study", str(study), "--top", str(self.s["soup_top"]), "--checkpoints", *extra_ckpts,
                   "--val-data", self.lmdb("valid"), "--method", "uniform,greedy,pairwise",
                   "--select-split", "0.5", "--output", str(out), "--device", self.device])
        return out

    # ------------------------------------------------------------ scoring
    def score(self, name: str, ckpt: Path, submission: Path | None = None) -> dict:
        """Valid score (evaluate_split) and test score (features -> predict -> evaluate, as a submission)."""
        from solution import evaluate, features, predict
        from solution.model import load_model
        from solution.retrieval.encode import evaluate_split

        self.stage(f"score {name}")
        model, config, _ = load_model(ckpt, device=self.device)
        valid = evaluate_split(model, self.lmdb("valid"), config, device=self.device)
        fdir = self.out / "feats" / name
        features.main(["--extract-image-feats", "--extract-text-feats", "--image-data", self.lmdb("test"),
                       "--text-data", str(self.data / "test_texts.jsonl"), "--resume", str(ckpt),
                       "--image-feat-output-path", str(fdir / "test_imgs.npy"),
                       "--text-feat-output-path", str(fdir / "test_texts.npy"), "--device", self.device,
                       "--cache-dir", str(self.out / "feature_cache"), "--no-progress",
                       "--precision", "fp32"])
        sub = submission or fdir / "test_pred.jsonl"
        predict.main(["--image-feats", str(fdir / "test_imgs.npy"), "--text-feats", str(fdir / "test_texts.npy"),
                      "--top-k", "10", "--output", str(sub), "--valid-score", json.dumps(valid), "--no-progress"])
        evaluate.main([str(self.data / "test_answers.jsonl"), str(sub), str(fdir / "test_score.json")])
        test = json.loads((fdir / "test_score.json").read_text())
        if not test.get("success"):
            raise SolutionError(f"test scoring of {name} failed: {test.get('errorMsg')}")
        return {"valid": valid, "test": test["scoreJson"], "checkpoint": str(ckpt)}

    # ------------------------------------------------------------ main
    def run(self) -> dict:
        self.make_data()
        base = self.train("base", ["--max-steps", str(self.s["base_steps"])], general=True)
        self.base_ckpt = Path(base["best_checkpoint"])
        default = self.finetune("default")
        lora = self.finetune("lora", ["--lora-rank", "8", "--lora-alpha", "16", "--lr", "1e-3"])
        frozen = self.finetune("frozen-image", ["--freeze-vision"])
        study = self.search()
        soups = self.soups(study, [default["best_checkpoint"], frozen["best_checkpoint"]])

        rows = {"initial (base, no fine-tune)": self.base_ckpt, "default fine-tune": Path(default["best_checkpoint"]),
                "LoRA": Path(lora["best_checkpoint"]), "frozen image tower": Path(frozen["best_checkpoint"])}
        if (study / "trials.csv").is_file():
            rows["best search trial"] = study_checkpoints(study, top=1)[0]
        for method in ("uniform", "greedy", "pairwise"):
            p = soups / method / "soup.pt"
            if p.is_file():
                rows[f"{method} soup"] = p
        # The submission is the greedy soup (the default fine-tune if there is none): scored once, as a row.
        final_row = "greedy soup" if "greedy soup" in rows else "default fine-tune"
        results = {name: self.score(name.replace(" ", "_").split("(")[0].strip("_"), ckpt,
                                    SUBMISSIONS / "demo_test.jsonl" if name == final_row else None)
                   for name, ckpt in rows.items()}
        results["final"] = results[final_row]
        write_json(self.out / "results.json", results)
        from solution.report.demo_report import write_report

        write_report(self.out, results, study=study, soups=soups, base=self.base_ckpt, final=rows[final_row],
                     lmdb_valid=self.lmdb("valid"), device=self.device, elapsed=time.time() - self.t0)
        self.stage(f"done: {self.out / 'REPORT.md'}")
        return results


SCALES = {
    # full demo: about 5 min on 2 cores (the last measurement)
    "full": {"data": {}, "base_steps": 600, "soup_top": 4, "trial": {"max-steps": 60, "valid-step-interval": 20},
             "train": ["--batch-size", "64", "--valid-batch-size", "128", "--lr", "2e-3", "--warmup", "50",
                       "--wd", "0.05", "--valid-step-interval", "100", "--log-interval", "20"],
             "finetune": ["--max-steps", "150", "--lr", "5e-4", "--warmup", "10", "--valid-step-interval", "50"]},
    # a scaled-down end-to-end run for the test suite
    "smoke": {"data": {"preset": "small"}, "base_steps": 30, "soup_top": 2,
              "trial": {"max-steps": 8, "valid-step-interval": 4, "batch-size": 16},
              "train": ["--batch-size", "16", "--valid-batch-size", "64", "--lr", "2e-3", "--warmup", "5",
                        "--valid-step-interval", "15", "--log-interval", "5"],
              "finetune": ["--max-steps", "10", "--lr", "5e-4", "--warmup", "2", "--valid-step-interval", "5"]},
}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m solution.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="working folder (re-running resumes)")
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--search-trials", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads: 1 is fastest for the tiny demo models (two fight each other under load)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    trials = args.search_trials or (6 if args.scale == "full" else 2)
    return Demo(Path(args.out), args.scale, args.device, trials).run()


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""The pipeline: recipe checks, the choice by cross-fitted evidence, a tiny plan end to end, kill -9 resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import one_error_line

from solution import pipeline
from solution.autopilot.evidence import Candidate, choose
from solution.autopilot.recipe import load_recipe
from solution.autopilot.stages import Stages
from solution.retrieval.metrics import recall_from_hits

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "pipeline").glob("*.yaml"))
pytestmark = pytest.mark.xdist_group("pipeline")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_passes_its_dry_run(recipe, tmp_path, capsys):
    result = pipeline.main(["--config", str(recipe), "--data", str(tmp_path / "data"), "--dry-run"])
    out = capsys.readouterr().out
    assert result["commands"] and ("train_clip.sh" in out or "-m solution.train" in out)
    assert "model_soup.sh" in out and "ensemble.sh" in out and not (tmp_path / "data").exists()


def test_the_search_samples_with_the_recipe_s_seed_unless_its_config_has_one(tmp_path):
    demo = ROOT / "configs" / "pipeline" / "demo.yaml"
    sampler = Stages(load_recipe(demo, sets=["seed=7"])).search_config(None)["sampler"]
    assert sampler == {"name": "tpe", "n_startup_trials": 3, "seed": 7}  # the config's seed is null
    config = tmp_path / "s.yaml"
    config.write_text("sampler: {name: random, seed: 123}\nspace: {}\n", encoding="utf-8")
    recipe = load_recipe(demo, sets=["seed=7", f"search.config={config}"])
    assert Stages(recipe).search_config(None)["sampler"] == {"name": "random", "seed": 123}
    h14 = Stages(load_recipe(ROOT / "configs" / "pipeline" / "muge-vit-h-14.yaml")).search_config(None)
    assert (h14["gpus_per_trial"], h14["torchrun_nproc"]) == (2, 2)  # the search config says 8 and 8


def _recipe(tmp_path, **changes) -> Path:
    base = {
        "data": str(tmp_path / "d"),
        "train": {"max-steps": 2},
        "starts": {"base": {"seed": 1}},
        "runs": {"a": {"start": "base"}},
        "soups": {"methods": ["greedy"], "members": ["a", "base"]},
    }
    for key, value in changes.items():
        node, parts = base, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"color": 1}, "r.yaml: color: unknown key"),
        ({"runs.a.lrr": 0.1}, "r.yaml: runs.a.lrr: unrecognized arguments: --lrr"),
        ({"runs.a.lr": -1}, "r.yaml: runs.a.lr: --lr -1"),
        ({"runs.a.start": "nope"}, "r.yaml: runs.a.start: no start named 'nope'"),
        ({"submit": "soup-uniform"}, "r.yaml: submit: no candidate named 'soup-uniform'"),
        ({"soups.members": ["a", "zz"]}, "r.yaml: soups.members: 'zz' is neither"),
        ({"search.start": "base"}, "r.yaml: search.config: the search config YAML is required"),
        ({"ensembles": [{"name": "e", "members": ["a", "x"]}]}, "ensembles: e.members: no candidate named 'x'"),
        ({"folds": 1}, "r.yaml: folds: cross-fitting needs at least 2 folds"),
        ({"ensembles": [{"name": "e", "members": ["trial-0001"]}]}, "e.members: no candidate named 'trial-0001'"),
        ({"ensembles": [{"name": "e", "norm": "zz"}]}, "r.yaml: the ensemble e stage: argument --norm: invalid choice"),
    ],
)
def test_a_bad_recipe_is_one_line_naming_file_and_key_before_any_work(tmp_path, capsys, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)  # the recipe's default out: runs/pipeline here
    code, line = one_error_line(capsys, monkeypatch, pipeline.main, ["--config", str(_recipe(tmp_path, **change))])
    assert code == 2 and message in line, line
    assert not (tmp_path / "d").exists() and not (tmp_path / "runs").exists()


def _cand(name, kind, per_fold, valid_mr=50.0):
    """A candidate whose held-out hits give exactly ``per_fold`` (hits at 1/5/10 all equal: fold MR = share of hits)."""
    hits = np.concatenate([np.repeat(np.arange(4) < round(4 * s / 100), 3).reshape(4, 3) for s in per_fold])
    c = Candidate(name, kind, f"{name}.pt", valid_mr, [], hits)
    c.fold_scores = [recall_from_hits(hits[4 * i : 4 * i + 4])["mean_recall"] for i in range(len(per_fold))]
    return c


def test_a_soup_best_in_sample_but_worse_cross_fitted_is_not_submitted():
    single = _cand("run", "single", [75, 75, 50], valid_mr=66.0)
    soup = _cand("soup-greedy", "soup", [50, 50, 50], valid_mr=80.0)  # chose on all queries: looks best in-sample
    chosen, why = choose([soup, single])
    assert chosen is single and "cross-fitted mean recall 66.67" in why[0] and "soup-greedy" in why[1]


def test_candidates_equal_on_every_fold_are_chosen_deterministically():
    folds = [75, 50, 25]
    cands = [_cand("z", "ensemble", folds), _cand("b", "single", folds), _cand("a", "single", folds)]
    assert choose(cands)[0].name == choose(cands[::-1])[0].name == "a"


def test_prefer_simpler_takes_an_indistinguishable_simpler_candidate():
    ens, single = _cand("e", "ensemble", [75, 75, 75]), _cand("s", "single", [75, 50, 75])
    assert choose([ens, single])[0] is ens
    chosen, why = choose([ens, single], prefer_simpler=True)
    assert chosen is single and "not distinguishable" in why[1] and "prefer_simpler" in why[1]
    strong = _cand("e2", "ensemble", [100, 100, 100])
    assert choose([strong, _cand("s0", "single", [0, 0, 0])], prefer_simpler=True)[0] is strong


# ---------------------------------------------------------------- a whole tiny plan


TINY = """
data: {data}
out: {out}
device: cpu
threads: 1
folds: 2
test_answers: test_answers.jsonl
train: {{vision-model: ViT-Tiny, text-model: RBT-Tiny, context-length: 32, batch-size: 24, max-steps: 4, lr: 2.0e-3,
        warmup: 1, valid-step-interval: 2, valid-epoch-interval: 0, save-epoch-frequency: 0, num-workers: 0,
        valid-num-workers: 0, precision: fp32, no-progress: true, no-plot: true}}
starts: {{base: {{checkpoint: {base}}}}}
runs:
  a: {{start: base}}
  b: {{start: base, seed: 5, lr: 7.0e-4}}
  scratch: {{seed: 3}}
soups: {{methods: [greedy, uniform], members: [a, b]}}
ensembles:
  - {{name: ens, members: singles, rerank: [none, dual_softmax]}}
"""


@pytest.fixture(scope="module")
def tiny_plan(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY.format(data=world.data, out="OUT", base=world.base), encoding="utf-8")
    result = pipeline.main(["--config", str(recipe), "--out", str(root / "ref")])
    return recipe, root, result


def test_a_tiny_plan_submits_its_best_cross_fitted_candidate(tiny_plan, world):
    from solution.retrieval.official import check_submission, query_ids

    recipe, root, result = tiny_plan
    out = root / "ref"
    rows = (out / "candidates.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "name,kind,valid_mr,cv_mr,cv_low,cv_high,test_mr,submitted"
    table = [r.split(",") for r in rows[1:]]
    assert {r[1] for r in table} == {"single", "soup", "ensemble"} and len(table) == 6
    submitted = [r for r in table if r[-1] == "True"]
    assert len(submitted) == 1 and float(submitted[0][3]) == max(float(r[3]) for r in table)
    assert submitted[0][0] == result["chosen"].name
    checked = check_submission(out / "submission.jsonl", query_ids(world.data / "test_texts.jsonl"))
    assert not checked.problems and all(len(v) == 10 for v in checked.predictions.values())
    report = (out / "REPORT.md").read_text(encoding="utf-8")
    assert result["chosen"].name in report and "Against the runner-up" in report
    other = next(r[0] for r in table if r[-1] != "True" and r[1] == "single")  # submitted by name on a re-run
    shutil.copytree(out, root / "again")
    pipeline.main(["--config", str(recipe), "--out", str(root / "again"), "--set", f"submit={other}"])
    manifest = json.loads((root / "again" / "submission.json").read_text(encoding="utf-8"))
    assert manifest["choice"]["candidate"] == other
    assert (root / "again" / "submission.jsonl").read_bytes() == (out / "test" / f"{other}.jsonl").read_bytes()


HOOK = """
import contextlib, os, signal, sys
from solution import common
real, marker, nth, seen = common.atomic_path, os.environ["KILL_IN"], int(os.environ["KILL_NTH"]), [0]
@contextlib.contextmanager
def hooked(path):
    with real(path) as tmp:
        yield tmp
        if marker in str(path):
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
common.atomic_path = hooked
from solution import pipeline
pipeline.main(sys.argv[1:])
"""


def test_kill_9_in_three_stages_then_the_same_command_ends_with_the_same_submission(tiny_plan, tmp_path):
    recipe, root, _ = tiny_plan
    script = tmp_path / "hooked.py"
    script.write_text(HOOK, encoding="utf-8")
    argv = [sys.executable, str(script), "--config", str(recipe), "--out", str(tmp_path / "out")]
    for where, nth in ((f"{os.sep}runs{os.sep}b{os.sep}", 2), ("soups.building", 3), (f"{os.sep}ensembles", 2)):
        env = {**os.environ, "KILL_IN": where, "KILL_NTH": str(nth), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, (where, proc.stderr[-3000:])
    done = subprocess.run(
        argv, env={**os.environ, "KILL_IN": "never", "KILL_NTH": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "submission.jsonl").read_bytes() == (root / "ref" / "submission.jsonl").read_bytes()

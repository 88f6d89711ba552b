"""The whole flow, scaled down: demo data -> prepare -> base -> search -> fine-tunes -> soups ->
other members -> submissions -> offline score -> ensembles -> REPORT.md. One run (about a minute on
2 cores), then a re-run.

Oracles: the files each stage wrote. The report's score table against the evaluator's score files
and a fresh validation of two of the checkpoints; its intervals against a paired bootstrap of the
stored per-query hits, whose mean recall is the printed score; each soup's weights against the
weighted sum of the members its log names; the soup rows of the comparison table against the soup
logs; the submission against the offline evaluator; a re-run against the modification times of what
it would otherwise redo."""

import json
import re
from pathlib import Path

import pytest
import torch

from solution import demo
from solution.ensembles.spec import read_ensemble
from solution.evaluate import main as evaluate_main
from solution.formats.hits import align, read_hits
from solution.model import clean_state_dict, load_model, read_checkpoint, state_dict_digest
from solution.retrieval.encode import evaluate_split
from solution.retrieval.metrics import mean_recall
from solution.stats import paired_bootstrap

SCORES = ("r1", "r5", "r10", "mean_recall")


def _markdown_rows(text: str, header_start: str) -> list[dict]:
    """The rows of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))))
    return rows


def _score_table(report: str) -> dict[str, dict]:
    """REPORT.md's score table: model name -> {"kind", "numbers": the eight scores, "valid"/"test": interval cell}."""
    out = {}
    for row in _markdown_rows(report, "| model |"):
        v = list(row.values())
        out[v[0]] = {"kind": v[1], "numbers": [float(x) for x in v[2:6] + v[7:11]], "valid": v[6], "test": v[11]}
    return out


def _interval(cell: str) -> tuple[float, float, float, bool]:
    m = re.fullmatch(r"([+-]\d+\.\d\d) \[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\]( \*)?", cell)
    assert m, cell
    return float(m[1]), float(m[2]), float(m[3]), bool(m[4])


def _printed(scores: dict) -> list[float]:
    return [round(scores[k], 2) for k in ("r1", "r5", "r10", "mean_recall")]


def _check_soup_weights(soup_dir: Path, chosen: dict) -> None:
    """soup.pt holds the weighted sum of the members the soup's summary names, tensor by tensor."""
    soup = clean_state_dict(read_checkpoint(soup_dir / "soup.pt")["state_dict"])
    members = [clean_state_dict(read_checkpoint(p)["state_dict"]) for p in chosen["members"]]
    for k, v in soup.items():
        if v.is_floating_point():
            expect = sum(w * m[k].float() for w, m in zip(chosen["weights"], members))
            torch.testing.assert_close(v.float(), expect, rtol=1e-5, atol=1e-6, msg=f"{soup_dir.name}: {k}")


def _weights_digest(path: Path) -> str:
    return state_dict_digest(clean_state_dict(read_checkpoint(path)["state_dict"]))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    sub_dir, out = root / "submissions", root / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "SUBMISSIONS", sub_dir)  # not the repository's submissions/
        results = demo.main(["--out", str(out), "--scale", "smoke", "--device", "cpu"])
        yield root, out, sub_dir, results


def _feats_name(name: str, result: dict) -> str:
    return Path(result["checkpoint"]).parent.name if result["kind"] == "ensemble" else demo.slug(name)


def test_report_scores_are_the_scores_the_stages_wrote(ran):
    _, out, _, results = ran
    table = _score_table((out / "REPORT.md").read_text(encoding="utf-8"))
    assert set(table) == set(results) - {"final"}
    assert {
        "initial (base, no fine-tune)",
        "default fine-tune",
        "LoRA",
        "frozen image tower",
        "best search trial",
        "ViT-Tiny-W96 (other architecture)",
        "from scratch (other start)",
        "uniform soup",
        "greedy soup",
        "pairwise soup",
        "ensemble (soup + W96 + scratch)",
    } <= set(table)
    reranked = sorted(n for n in table if "re-ranking" in n)
    assert [n.split(" (")[0] for n in reranked] == ["best single + re-ranking", "ensemble + re-ranking"]
    for name, row in table.items():  # test: the offline evaluator's file for that model (ensembles: their submission)
        score = json.loads((out / "feats" / _feats_name(name, results[name]) / "test_score.json").read_text())
        assert score["success"] and row["numbers"][4:] == _printed(score["scoreJson"]), name
        assert row["numbers"][:4] == _printed(results[name]["valid"]), name
        assert row["kind"] == results[name]["kind"]
    for name in ("initial (base, no fine-tune)", "greedy soup"):  # valid: scored again from the checkpoint
        model, config, _ = load_model(results[name]["checkpoint"], device="cpu")
        fresh = evaluate_split(model, str(out / "data" / "lmdb" / "valid"), config, device="cpu")
        assert table[name]["numbers"][:4] == _printed(fresh), name


def test_every_row_has_its_interval_against_the_best_single_model(ran):
    _, out, _, results = ran
    report = (out / "REPORT.md").read_text(encoding="utf-8")
    table = _score_table(report)
    singles = {n: r for n, r in results.items() if r.get("kind") == "single"}
    ref = max(singles, key=lambda n: singles[n]["valid"]["mean_recall"])
    assert table[ref]["valid"] == table[ref]["test"] == "reference"
    for name, row in table.items():
        for part in ("valid", "test"):
            mine, other = read_hits(results[name]["hits"][part]), read_hits(results[ref]["hits"][part])
            assert round(mean_recall(mine[1]), 2) == _printed(results[name][part])[3], (name, part)
            if name == ref:
                continue
            b = paired_bootstrap(mine[1], align(mine, other), n_resamples=1000, seed=0)
            assert _interval(row[part]) == (round(b.diff, 2), round(b.low, 2), round(b.high, 2), b.significant)
            # the paragraph names the row among the real or the indistinguishable differences of that part
            words = next(ln for ln in report.split("\n\n") if ln.startswith(f"On {part},"))
            assert name in words, (name, part)
    assert f"best single model on valid, **{ref}**" in report


def test_the_ensemble_fuses_what_a_soup_cannot(ran):
    _, out, _, results = ran
    spec = read_ensemble(out / "ensembles" / "ensemble" / "ensemble.json")
    assert len(spec["members"]) == 3 and spec["crossfit"]["folds"] == 2
    archs = {
        json.dumps(read_checkpoint(m["path"])["config"].get("vision_model"), sort_keys=True) for m in spec["members"]
    }
    assert len(archs) == 2  # ViT-Tiny (soup, scratch) and ViT-Tiny-W96
    row = results["ensemble (soup + W96 + scratch)"]
    assert row["kind"] == "ensemble" and row["weights"] == spec["weights"]
    assert row["valid"] == {k: spec["scores"]["all"][k] for k in SCORES}
    manifest = json.loads((out / "feats" / "ensemble" / "test_pred.json").read_text(encoding="utf-8"))
    assert manifest  # predict --ensemble wrote its manifest beside the submission


def test_soups_are_what_their_logs_say(ran):
    out = ran[1]
    compare = {
        Path(r["name"]).name: r
        for r in _markdown_rows((out / "compare.md").read_text(encoding="utf-8"), "| best |")
        if r["kind"] == "soup"
    }
    assert set(compare) == {"uniform", "greedy", "pairwise"}
    chosen = {}
    for method, row in compare.items():  # the comparison table shows the soup each summary names
        folder = out / "soups" / method
        chosen[method] = json.loads((folder / "summary.json").read_text(encoding="utf-8"))["soups"][method]
        c = chosen[method]
        # --folds: chosen on all the valid queries, the held-out estimate is the mean of the folds left out
        assert (float(row["mean_recall"]), float(row["held_out_mr"])) == (
            round(c["mean_recall"], 2),
            round(c["crossfit"]["mean"], 2),
        )
        assert c["crossfit"]["k"] == 2 and len(c["crossfit"]["fold_scores"]) == 2
        assert abs(sum(c["crossfit"]["fold_scores"]) / 2 - c["crossfit"]["mean"]) < 1e-9
        _check_soup_weights(folder, c)
    for method in ("uniform", "greedy"):  # ... which is the last candidate its log kept
        log = [json.loads(x) for x in (out / "soups" / method / "soup_log.jsonl").read_text().splitlines()]
        final = [r for r in log if r["method"] == method and r["kept"]][-1]
        assert {k: final[k] for k in ("members", "weights", "mean_recall")} == {
            k: chosen[method][k] for k in ("members", "weights", "mean_recall")
        }, method
        if method == "greedy":  # greedy starts from the best single ingredient
            first = next(r for r in log if r["method"] == "greedy")
            assert first["mean_recall"] == max(r["mean_recall"] for r in log if r["method"] == "ingredient")


def test_submission_scores_what_the_results_say(ran):
    root, out, sub_dir, results = ran
    sub = sub_dir / "demo_test.jsonl"
    assert sub.is_file() and (sub_dir / "demo_test.json").is_file()
    assert results["final"] == results["greedy soup"]
    assert results["final"]["kind"] == "soup"
    assert results["final"]["checkpoint"] == str(out / "soups" / "greedy" / "soup.pt")
    evaluate_main([str(out / "data" / "test_answers.jsonl"), str(sub), str(root / "score.json")])
    score = json.loads((root / "score.json").read_text())
    assert score["success"] and abs(score["score"] - results["final"]["test"]["mean_recall"]) < 1e-9
    report = (out / "REPORT.md").read_text(encoding="utf-8")
    assert "embedding_map.png" in report and (out / "plots" / "embedding_map.png").stat().st_size > 1000


def test_a_rerun_reuses_every_stage(ran):
    _, out, _, results = ran
    reused = sorted(
        [
            *(out / "runs").glob("*/checkpoints/*.pt"),
            *(out / "search").glob("demo/trials/*/checkpoints/*.pt"),
            out / "data" / "lmdb" / "test" / "imgs" / "data.mdb",
        ]
    )
    assert len(reused) > 10
    before = {p: p.stat().st_mtime_ns for p in reused}
    soups = {p: _weights_digest(p) for p in (out / "soups").glob("*/soup.pt")}
    again = demo.main(["--out", str(out), "--scale", "smoke", "--device", "cpu"])
    assert {p: p.stat().st_mtime_ns for p in reused} == before  # nothing retrained or re-prepared
    assert {p: _weights_digest(p) for p in soups} == soups  # soups: the same weights ...
    for log in (out / "soups").glob("*/soup_log.jsonl"):  # ... from scores in the cache, not scored again
        rows = [json.loads(x) for x in log.read_text().splitlines()]
        assert rows and all(r.get("cached") for r in rows if r.get("mean_recall") is not None), log
    assert again == results

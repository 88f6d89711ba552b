"""The whole flow, scaled down: demo data -> prepare -> base -> search -> fine-tunes -> soups ->
submission -> offline score -> REPORT.md. One run (about a minute on 2 cores), then a re-run.

Oracles: the files each stage wrote. The report's score table against the evaluator's score files
and a fresh validation of two of the checkpoints; each soup's weights against the weighted sum of
the members its log names; the soup rows of the comparison table against the soup logs; the
submission against the offline evaluator; a re-run against the modification times of what it
would otherwise redo."""
import json
import re
from pathlib import Path

import pytest
import torch

from solution import demo
from solution.evaluate import main as evaluate_main
from solution.model import clean_state_dict, load_model, read_checkpoint, state_dict_digest
from solution.retrieval.encode import evaluate_split

COLUMNS = [f"{part} {k}" for part in ("valid", "test") for k in ("r1", "r5", "r10", "mean_recall")]


def _markdown_rows(text: str, header_start: str) -> list[dict]:
    """The rows of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))))
    return rows


def _score_table(report: str) -> dict[str, list[float]]:
    """REPORT.md's score table: model name -> the eight numbers, as printed."""
    out = {}
    for row in _markdown_rows(report, "| model |"):
        values = list(row.values())
        out[re.sub(r" \*\*\(best valid\)\*\*$", "", values[0])] = [float(v) for v in values[1:]]
    return out


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


def test_report_scores_are_the_scores_the_stages_wrote(ran):
    _, out, _, results = ran
    table = _score_table((out / "REPORT.md").read_text(encoding="utf-8"))
    assert {"initial (base, no fine-tune)", "default fine-tune", "LoRA", "frozen image tower", "best search trial",
            "uniform soup", "greedy soup", "pairwise soup"} == set(table) == set(results) - {"final"}
    for name, numbers in table.items():  # test: the offline evaluator's file for that model
        slug = name.replace(" ", "_").split("(")[0].strip("_")
        score = json.loads((out / "feats" / slug / "test_score.json").read_text())
        assert score["success"] and numbers[4:] == _printed(score["scoreJson"]), name
        assert numbers[:4] == _printed(results[name]["valid"]), name
    for name in ("initial (base, no fine-tune)", "greedy soup"):  # valid: scored again from the checkpoint
        model, config, _ = load_model(results[name]["checkpoint"], device="cpu")
        fresh = evaluate_split(model, str(out / "data" / "lmdb" / "valid"), config, device="cpu")
        assert table[name][:4] == _printed(fresh), name


def test_soups_are_what_their_logs_say(ran):
    out = ran[1]
    compare = {Path(r["name"]).name: r for r in _markdown_rows((out / "compare.md").read_text(encoding="utf-8"),
                                                                "| best |") if r["kind"] == "soup"}
    assert set(compare) == {"uniform", "greedy", "pairwise"}
    chosen = {}
    for method, row in compare.items():  # the comparison table shows the soup each summary names
        folder = out / "soups" / method
        chosen[method] = json.loads((folder / "summary.json").read_text(encoding="utf-8"))["soups"][method]
        c = chosen[method]
        assert (float(row["mean_recall"]), float(row["select_mr"]), float(row["held_out_mr"])) == (
            round(c["all"]["mean_recall"], 2), round(c["mean_recall"], 2), round(c["report"]["mean_recall"], 2))
        _check_soup_weights(folder, c)
    for method in ("uniform", "greedy"):  # ... which is the last candidate its log kept
        log = [json.loads(x) for x in (out / "soups" / method / "soup_log.jsonl").read_text().splitlines()]
        final = [r for r in log if r["method"] == method and r["kept"]][-1]
        assert {k: final[k] for k in ("members", "weights", "mean_recall", "report", "all")} == \
               {k: chosen[method][k] for k in ("members", "weights", "mean_recall", "report", "all")}, method
        if method == "greedy":  # greedy starts from the best single ingredient on the selection part
            first = next(r for r in log if r["method"] == "greedy")
            assert first["mean_recall"] == max(r["mean_recall"] for r in log if r["method"] == "ingredient")


def test_submission_scores_what_the_results_say(ran):
    root, out, sub_dir, results = ran
    sub = sub_dir / "demo_test.jsonl"
    assert sub.is_file() and (sub_dir / "demo_test.json").is_file()
    assert results["final"] == results["greedy soup"]
    assert results["final"]["checkpoint"] == str(out / "soups" / "greedy" / "soup.pt")
    evaluate_main([str(out / "data" / "test_answers.jsonl"), str(sub), str(root / "score.json")])
    score = json.loads((root / "score.json").read_text())
    assert score["success"] and abs(score["score"] - results["final"]["test"]["mean_recall"]) < 1e-9
    report = (out / "REPORT.md").read_text(encoding="utf-8")
    assert "embedding_map.png" in report and (out / "plots" / "embedding_map.png").stat().st_size > 1000


def test_a_rerun_reuses_every_stage(ran):
    _, out, _, results = ran
    reused = sorted([*(out / "runs").glob("*/checkpoints/*.pt"), *(out / "search").glob("demo/trials/*/checkpoints/*.pt"),
                     out / "data" / "lmdb" / "test" / "imgs" / "data.mdb"])
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

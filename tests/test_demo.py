"""The whole flow, scaled down: demo data -> prepare -> base -> search -> fine-tunes -> soups ->
submission -> offline score -> REPORT.md. One run, a few minutes at most on 2 cores."""
import json

from solution import demo
from solution.retrieval.evaluate import main as evaluate_main


def test_scaled_down_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "ROOT", demo.ROOT)  # configs are read from the repo
    sub_dir = tmp_path / "submissions"
    monkeypatch.setattr(demo, "SUBMISSIONS", sub_dir)
    out = tmp_path / "demo"
    results = demo.main(["--out", str(out), "--scale", "smoke", "--device", "cpu"])

    # every variant was scored on valid and, as a submission, on test
    for name, r in results.items():
        assert 0 <= r["valid"]["mean_recall"] <= 100 and 0 <= r["test"]["mean_recall"] <= 100, name
    assert {"initial (base, no fine-tune)", "LoRA", "frozen image tower", "greedy soup", "uniform soup"} <= set(results)

    # the greedy soup is never worse than its best ingredient on the selection split (its own log)
    log = [json.loads(l) for l in (out / "soups" / "greedy" / "soup_log.jsonl").read_text().splitlines()]
    greedy = [r for r in log if r["method"] == "greedy"]
    kept = [r for r in greedy if r["kept"]]
    assert kept and kept[-1]["mean_recall"] >= kept[0]["mean_recall"]

    # the submission is valid for the official checker and scores what the results say
    sub = sub_dir / "demo_test.jsonl"
    assert sub.is_file() and (sub_dir / "demo_test.json").is_file()
    evaluate_main([str(out / "data" / "test_answers.jsonl"), str(sub), str(tmp_path / "score.json")])
    score = json.loads((tmp_path / "score.json").read_text())
    assert score["success"] and abs(score["score"] - results["final"]["test"]["mean_recall"]) < 1e-9

    report = (out / "REPORT.md").read_text()
    assert "| greedy soup" in report and "embedding_map.png" in report
    assert (out / "plots" / "embedding_map.png").stat().st_size > 1000

    # re-running reuses what is done (no retraining: checkpoints untouched)
    base = out / "runs" / "base" / "checkpoints" / "best.pt"
    mtime = base.stat().st_mtime
    demo.main(["--out", str(out), "--scale", "smoke", "--device", "cpu"])
    assert base.stat().st_mtime == mtime

"""solution.compare: one table (and a PNG) over training runs, soups and search studies
(read by solution.report.folders, tabled and drawn by solution.report.table)."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from solution import compare as compare_cli
from solution.common import SolutionError, write_json, write_jsonl
from solution.report import folders as runs
from solution.report import table as compare


def _run(path, scores, lr, extra_general=None):
    """A run dir: train lines, main-set valid lines at steps 10, 20, ... and params.json."""
    rows = []
    for i, mr in enumerate(scores, 1):
        rows.append({"step": 10 * i - 5, "epoch": i, "kind": "train", "loss": 1.0 / i})
        scores = {"r1": mr - 5, "r5": mr, "r10": mr + 5, "mean_recall": mr}
        rows.append({"step": 10 * i, "epoch": i, "kind": "valid", "set": "valid", **scores})
        if extra_general is not None:
            rows.append({"step": 10 * i, "epoch": i, "kind": "valid", "set": "general", "mean_recall": extra_general})
    write_jsonl(path / "metrics.jsonl", rows)
    params = {"lr": lr, "batch_size": 32, "logs": str(path.parent), "name": path.name}
    write_json(path / "params.json", {**params, "model_config": {"vision_model": "ViT-Tiny"}})
    (path / "checkpoints").mkdir(parents=True)
    return path


def _row(method, rnd, members, mean_recall, kept=True, **more):
    return {"method": method, "round": rnd, "members": members, "mean_recall": mean_recall, **more, "kept": kept}


def _soup(path, with_summary=True):
    """Three ingredients; greedy keeps the second (selection 45, report 43, all queries 44), drops the third."""
    chosen = {"r1": 40.0, "r5": 45.0, "r10": 50.0, "mean_recall": 45.0, "report": {"mean_recall": 43.0}}
    chosen["all"] = {"r1": 39.0, "r5": 44.0, "r10": 49.0, "mean_recall": 44.0}
    rows = [
        _row("ingredient", 0, [p], s, r1=s, r5=s, r10=s) for p, s in (("a.pt", 40.0), ("b.pt", 38.0), ("c.pt", 30.0))
    ]
    rows += [_row("greedy", 0, ["a.pt"], 40.0), _row("greedy", 1, ["a.pt", "b.pt"], **chosen)]
    rows += [_row("greedy", 2, ["a.pt", "b.pt", "c.pt"], 41.0, kept=False)]
    write_jsonl(path / "soup_log.jsonl", rows)
    if with_summary:
        soups = {"greedy": {"members": ["a.pt", "b.pt"], "weights": [0.5, 0.5], **chosen}}
        write_json(path / "summary.json", {"soup": str(path / "soup.pt"), "method": "greedy", "soups": soups})
    return path


def _study(path):
    trial0 = _run((path / "trials" / "0000").resolve(), [20.0, 35.0], lr=1e-4)
    (path / "trials.csv").write_text(
        "number,state,value,run_dir,params_lr\n"
        f"0,COMPLETE,35.0,{trial0},0.0001\n"
        f"1,COMPLETE,33.5,{path / 'trials' / '0001'},0.001\n"
        f"2,PRUNED,,{path / 'trials' / '0002'},0.01\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def tree(tmp_path):
    _run(tmp_path / "logs" / "run_a", [30.0, 42.0, 41.0], lr=1e-5, extra_general=90.0)
    _run(tmp_path / "logs" / "run_b", [25.0, 28.0], lr=3e-5)
    _soup(tmp_path / "soups" / "s1")
    _study(tmp_path / "search" / "st")
    return tmp_path


def _csv(text):
    return pd.read_csv(io.StringIO(text), keep_default_na=False)


def test_table_sorted_with_best_marked(tree, monkeypatch):
    monkeypatch.chdir(tree)
    text = compare_cli.main(["logs", "soups/s1", "search/st", "--csv", "--no-plot"])
    df = _csv(text)
    assert list(df["name"]) == [
        "soups/s1",
        "logs/run_a",
        "search/st/trial 0",
        "search/st/trial 1",
        "logs/run_b",
        "search/st/trial 2",
    ]
    assert list(df["best"]) == ["*", "", "", "", "", ""]
    mr = [float(x) if x != "" else float("nan") for x in df["mean_recall"]]
    assert mr[:5] == [44.0, 42.0, 35.0, 33.5, 28.0] and mr[5] != mr[5]  # the pruned trial has no score: last
    # the soup's row: all queries in mean_recall, the selection and held-out parts beside it
    assert float(df.loc[0, "select_mr"]) == 45.0 and float(df.loc[0, "held_out_mr"]) == 43.0


def test_run_best_is_the_main_set_and_its_step(tree):
    e = runs.read_run(tree / "logs" / "run_a", "a")
    assert e.scores == {"mean_recall": 42.0, "r1": 37.0, "r5": 42.0, "r10": 47.0}  # not the "general" set's 90
    assert e.step == 20
    assert e.curve == [(10, 30.0), (20, 42.0), (30, 41.0)]
    assert "logs" not in e.settings and "name" not in e.settings and e.settings["lr"] == 1e-5


def test_settings_that_differ_are_shown(tree):
    df = compare.table(runs.collect([str(tree / "logs"), str(tree / "soups")]))
    assert "lr" in df.columns and "method" in df.columns and "members" in df.columns
    assert "batch_size" not in df.columns  # the same in every run
    assert "model_config.vision_model" not in df.columns


def test_soup_rows_from_summary_and_from_log(tree, tmp_path):
    (e,) = runs.read_soup(tree / "soups" / "s1", "s1")
    assert (e.kind, e.scores["mean_recall"], e.held_out, e.settings["members"]) == ("soup", 44.0, 43.0, 2)
    assert e.scores["r1"] == 39.0 and e.extra["select_mr"] == 45.0
    assert e.extra["vs_best_single"] == pytest.approx(5.0)
    assert e.curve == [(0, 40.0, ""), (1, 45.0, "")]  # the candidates greedy kept (not the third)
    bare = tmp_path / "bare"
    bare.mkdir()
    _soup(bare, with_summary=False)
    (b,) = runs.read_soup(bare, "bare")
    assert b.scores["mean_recall"] == 44.0 and b.held_out == 43.0  # the best kept candidate
    assert b.extra["select_mr"] == 45.0


def test_study_rows(tree):
    rows = {e.name: e for e in runs.read_study(tree / "search" / "st", "st")}
    assert rows["st/trial 0"].scores["mean_recall"] == 35.0 and rows["st/trial 0"].curve  # from its run dir
    assert rows["st/trial 1"].scores == {"mean_recall": 33.5}  # from trials.csv
    assert rows["st/trial 2"].settings["state"] == "PRUNED" and not rows["st/trial 2"].scores
    assert rows["st/trial 1"].settings["lr"] == 0.001


def test_markdown_digest_full_csv_output_and_plot(tree, tmp_path):
    md, full, png = tmp_path / "cmp.md", tmp_path / "cmp.csv", tmp_path / "plots" / "cmp.png"
    text = compare_cli.main([str(tree / "logs"), str(tree / "soups"), "--output", str(md), "--plot", str(png)])
    lines = text.strip().splitlines()
    assert lines[0] == "| name | kind | MR | R@1 | R@5 | R@10 | vs best single [95% CI] |"
    assert lines[2].endswith("/soups/s1 | soup | 44.00 | 39.00 | 44.00 | 49.00 |  |") and len(lines) == 5
    assert md.read_text(encoding="utf-8") == text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    compare_cli.main([str(tree / "logs"), str(tree / "soups"), "--output", str(full), "--plot", str(png)])  # again
    assert {"best", "select_mr", "held_out_mr", "step", "vs_best_single", "note", "lr"} <= set(_csv(full.read_text()))


def test_an_output_that_is_another_file_is_refused(tree, tmp_path):
    (tmp_path / "mine.png").write_bytes(b"\x89PNG\r\n\x1a\n a user's picture")
    others = {"--output": tree / "logs" / "run_a" / "checkpoints" / "best.pt", "--plot": tmp_path / "mine.png"}
    others["--output"].write_bytes(b"PK\x03\x04 a checkpoint")
    for flag, path in others.items():
        before = path.read_bytes()
        with pytest.raises(SolutionError, match=f"{flag} .* is not an earlier output of this command"):
            compare_cli.main([str(tree / "logs"), flag, str(path), *(["--no-plot"] if flag == "--output" else [])])
        assert path.read_bytes() == before


def test_a_soup_whose_log_lost_its_candidates_is_shown_from_its_summary(tree, caplog):
    greedy = tree / "soups" / "s1"
    log = greedy / "soup_log.jsonl"
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:3]) + b'{"method": "greedy", "rou')
    (e,) = runs.collect([greedy])
    assert (e.name, e.scores["mean_recall"], e.held_out) == (str(greedy), 44.0, 43.0) and e.curve == []
    assert "soup_log.jsonl:4: skipping a last line torn by a kill" in caplog.text
    (greedy / "summary.json").unlink()
    with pytest.raises(SolutionError, match="nothing to compare"):
        runs.collect([greedy])
    assert f"{greedy} (a soup folder) left out of the table: " in caplog.text and "holds no soup" in caplog.text


@pytest.mark.parametrize(
    "path, text, lost",
    [
        ("logs/run_b/metrics.jsonl", '{"step": 1\n{"step": 2}\n', "logs/run_b"),  # torn mid-file
        (
            "logs/run_b/metrics.jsonl",
            '{"kind": "valid", "mean_recall": 28.0}\n{"kind": "valid", "mean',
            None,
        ),  # torn last
        ("soups/s1/summary.json", '{"soups": [1]}', None),  # only the summary is lost: the soup comes from its log
        ("soups/s1/summary.json", '{"soups": {"greedy": 5}}', "soups/s1"),
        ("soups/s1/soup_log.jsonl", '{"method": "ingredient", "mean_recall": "high"}\n' * 2, "soups/s1"),
        ("search/st/trials.csv", "number,state\n\udcff", "search/st"),  # not UTF-8
    ],
)
def test_a_bad_folder_costs_its_own_row_and_one_log_line(tree, monkeypatch, caplog, path, text, lost):
    monkeypatch.chdir(tree)
    rows = set(_csv(compare_cli.main(["logs", "soups", "search", "--csv", "--no-plot"]))["name"])
    (tree / path).write_bytes(text.encode("utf-8", "surrogateescape"))
    caplog.clear()
    after = set(_csv(compare_cli.main(["logs", "soups", "search", "--csv", "--no-plot"]))["name"])
    assert after == {r for r in rows if lost is None or not r.startswith(lost)}
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (lost or path) in warning


def test_files_given_directly(tree):
    a = runs.collect([str(tree / "logs" / "run_a" / "metrics.jsonl"), str(tree / "soups" / "s1" / "soup_log.jsonl")])
    assert [e.kind for e in a] == ["run", "soup"]


def test_bad_paths(tmp_path):
    with pytest.raises(SolutionError, match="not found"):
        compare_cli.main([str(tmp_path / "missing"), "--no-plot"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SolutionError, match="nothing to compare in"):
        compare_cli.main([str(tmp_path / "empty"), "--no-plot"])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SolutionError, match="expected a metrics.jsonl"):
        compare_cli.main([str(tmp_path / "x.txt"), "--no-plot"])

"""solution.compare: one table (and a PNG) of runs, soups, studies and ensembles with paired-bootstrap columns."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from cli_helpers import one_error_line, snapshot

from solution import compare as compare_cli
from solution.common import SolutionError, write_json, write_jsonl
from solution.formats import hits as hits_format
from solution.formats.hits import align, read_hits, write_hits
from solution.report import folders as runs
from solution.report import significance
from solution.report import table as compare
from solution.retrieval.metrics import mean_recall
from solution.stats import paired_bootstrap


def _run(path, scores, lr=1e-5, extra_general=None):
    """A run dir: train lines, main-set valid lines at steps 10, 20, ... (R@1/5/10: MR - 5, MR, MR + 5), params."""
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


ROWS = ["soups/s1", "logs/run_a", "search/st/trial 0", "search/st/trial 1", "logs/run_b", "search/st/trial 2"]


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # rows are named by their relative paths
    return tmp_path


@pytest.fixture
def tree(here):
    """Two runs, a soup and a study, in the current folder."""
    _run(here / "logs" / "run_a", [30.0, 42.0, 41.0], lr=1e-5, extra_general=90.0)
    _run(here / "logs" / "run_b", [25.0, 28.0], lr=3e-5)
    _soup(here / "soups" / "s1")
    _study(here / "search" / "st")
    return here


def _csv(text):
    return pd.read_csv(io.StringIO(text), keep_default_na=False)


def test_table_sorted_with_best_marked_and_settings_that_differ(tree):
    df = _csv(compare_cli.main(["logs", "soups/s1", "search/st", "--csv", "--no-plot"]))
    assert list(df["name"]) == ROWS and list(df["best"]) == ["*", "", "", "", "", ""]
    mr = [float(x) if x != "" else float("nan") for x in df["mean_recall"]]
    assert mr[:5] == [44.0, 42.0, 35.0, 33.5, 28.0] and mr[5] != mr[5]  # the pruned trial has no score: last
    # the soup's row: all queries in mean_recall, the selection and held-out parts beside it
    assert float(df.loc[0, "select_mr"]) == 45.0 and float(df.loc[0, "held_out_mr"]) == 43.0
    assert {"lr", "method", "members"} <= set(df.columns)
    assert "batch_size" not in df.columns and "model_config.vision_model" not in df.columns  # the same everywhere


def test_readers_of_runs_soups_studies_and_files(tree):
    e = runs.read_run(tree / "logs" / "run_a", "a")
    assert e.scores == {"mean_recall": 42.0, "r1": 37.0, "r5": 42.0, "r10": 47.0}  # not the "general" set's 90
    assert e.step == 20 and e.curve == [(10, 30.0), (20, 42.0), (30, 41.0)]
    assert "logs" not in e.settings and "name" not in e.settings and e.settings["lr"] == 1e-5
    (e,) = runs.read_soup(tree / "soups" / "s1", "s1")
    assert (e.kind, e.scores["mean_recall"], e.held_out, e.settings["members"]) == ("soup", 44.0, 43.0, 2)
    assert e.scores["r1"] == 39.0 and e.extra["select_mr"] == 45.0
    assert e.extra["vs_best_single"] == pytest.approx(5.0)
    assert e.curve == [(0, 40.0, ""), (1, 45.0, "")]  # the candidates greedy kept (not the third)
    (b,) = runs.read_soup(_soup(tree / "bare", with_summary=False), "bare")
    assert (b.scores["mean_recall"], b.held_out, b.extra["select_mr"]) == (44.0, 43.0, 45.0)  # best kept candidate
    rows = {e.name: e for e in runs.read_study(tree / "search" / "st", "st")}
    assert rows["st/trial 0"].scores["mean_recall"] == 35.0 and rows["st/trial 0"].curve  # from its run dir
    assert rows["st/trial 1"].scores == {"mean_recall": 33.5} and rows["st/trial 1"].settings["lr"] == 0.001
    assert rows["st/trial 2"].settings["state"] == "PRUNED" and not rows["st/trial 2"].scores
    files = runs.collect([tree / "logs" / "run_a" / "metrics.jsonl", tree / "soups" / "s1" / "soup_log.jsonl"])
    assert [e.kind for e in files] == ["run", "soup"]


def test_markdown_digest_full_csv_output_and_plot(tree):
    md, full, png = tree / "cmp.md", tree / "cmp.csv", tree / "plots" / "cmp.png"
    text = compare_cli.main(["logs", "soups", "--output", str(md), "--plot", str(png)])
    lines = text.strip().splitlines()
    assert lines[0] == "| name | kind | MR | R@1 | R@5 | R@10 | vs best single [95% CI] |"
    assert lines[2] == "| soups/s1 | soup | 44.00 | 39.00 | 44.00 | 49.00 |  |" and len(lines) == 5
    assert md.read_text(encoding="utf-8") == text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    compare_cli.main(["logs", "soups", "--output", str(full), "--plot", str(png)])  # again over its own plot
    assert {"best", "select_mr", "held_out_mr", "step", "vs_best_single", "note", "lr"} <= set(_csv(full.read_text()))


OUTPUTS = [  # (flag, path, words of the error line): an input, a folder, under a file, another file, the other flag
    *[(flag, "logs/run_a/metrics.jsonl", "refusing to overwrite it") for flag in ("--output", "--plot")],
    ("--output", "logs/run_a/params.json", "refusing to overwrite it"),
    *[(flag, "logs/run_a", "is a folder, expected a file path") for flag in ("--output", "--plot")],
    *[(flag, "logs/run_a/params.json/x", "sits under") for flag in ("--output", "--plot")],
    ("--output", "logs/run_a/checkpoints/best.pt", "is not an earlier output of this command"),
    ("--plot", "mine.png", "is not an earlier output of this command"),
    ("--plot", "c.md", "is one of the inputs"),  # --output's own path
]


@pytest.mark.parametrize("flag, path, words", OUTPUTS)
def test_an_output_that_cannot_be_written_is_refused_writing_nothing(tree, capsys, monkeypatch, flag, path, words):
    (tree / "mine.png").write_bytes(b"\x89PNG\r\n\x1a\n a user's picture")
    (tree / "logs" / "run_a" / "checkpoints" / "best.pt").write_bytes(b"PK\x03\x04 a checkpoint")
    before = snapshot(tree)
    other = {"--output": "c.md", "--plot": "c.png"}
    argv = ["logs", *(x for f, p in {**other, flag: path}.items() for x in (f, p))]
    code, line = one_error_line(capsys, monkeypatch, compare_cli.main, argv)
    assert code == 2 and flag in line and words in line, line
    assert snapshot(tree) == before  # nothing written


M, P, S = "logs/run_b/metrics.jsonl", "logs/run_a/params.json", "soups/s1/summary.json"
L, T = "soups/s1/soup_log.jsonl", "search/st/trials.csv"
TRAIN, HEAD = b'{"kind": "train", "step": 1}\n', b"number,state,value,run_dir\n"
BAD_FILES = [  # (file, content, whether its folder's rows are lost, words of the one warning)
    (M, b'{"step": 1\n{"step": 2}\n', True, "metrics.jsonl:1: not valid JSON"),
    (M, TRAIN + b'{"kind": "valid", "text": "\xff\xfe"}\n', True, "metrics.jsonl:2: not UTF-8"),
    (M, TRAIN + b"[1, 2]\n", True, "metrics.jsonl:2: record 2 is a list, not a JSON object"),
    (M, b'{"kind": "valid", "mean_recall": 28.0}\n{"kind": "valid", "mean', False, "metrics.jsonl:2: skipping"),
    (P, b'{"lr": "\xff"}\n', False, "params.json"),
    (P, b"[1, 2]\n", False, "params.json"),
    (S, b'{"soups": [1]}', False, "summary.json is not a soup summary"),  # the soup comes from its log
    (S, b'{"lr": "\xff"}\n', False, "summary.json is not a soup summary"),
    (S, b'{"soups": {"greedy": 5}}', True, "left out of the table"),
    (L, b'{"method": "ingredient", "mean_recall": "high"}\n' * 2, True, "left out of the table: unexpected content"),
    (L, b'{"method": "ingredient", "mean_recall": 1.0}\n\xc3\x28\n', True, "soup_log.jsonl:2: not UTF-8"),
    (T, HEAD + b"0,COMPLETE,1.0,r\n1,COMPLETE,2.0,\xe9t\xe9\n", True, "trials.csv:3: not UTF-8"),
    (T, HEAD + b'0,COMPLETE,1.0,"r\n1,COMPLETE,2.0,s\n', True, "trials.csv:2: malformed CSV"),
    (T, HEAD + b"0,COMPLETE,1.0,r,extra\n", True, "trials.csv:2: more fields than the header"),
]


@pytest.mark.parametrize("path, content, lost, words", BAD_FILES)
def test_a_bad_file_costs_its_folder_s_rows_at_most_and_one_warning(tree, caplog, path, content, lost, words):
    (tree / path).write_bytes(content)
    caplog.clear()
    names = _csv(compare_cli.main(["logs", "soups", "search", "--csv", "--no-plot"]))["name"]
    folder = path.rsplit("/", 1)[0]
    assert set(names) == {r for r in ROWS if not (lost and r.startswith(folder))}
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert folder in warning and words in warning, warning
    assert (tree / path).read_bytes() == content


def test_a_soup_whose_log_lost_its_candidates_is_shown_from_its_summary(tree, caplog):
    greedy = tree / "soups" / "s1"
    log = greedy / "soup_log.jsonl"
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:3]) + b'{"method": "greedy", "rou')
    (e,) = runs.collect([greedy])
    assert (e.name, e.scores["mean_recall"], e.held_out) == ("soups/s1", 44.0, 43.0) and e.curve == []
    assert "soup_log.jsonl:4: skipping a last line torn by a kill" in caplog.text
    (greedy / "summary.json").unlink()
    with pytest.raises(SolutionError, match="nothing to compare"):
        runs.collect([greedy])
    assert f"{greedy} (a soup folder) left out of the table: " in caplog.text and "holds no soup" in caplog.text


def test_bad_paths(tmp_path):
    with pytest.raises(SolutionError, match="not found"):
        compare_cli.main([str(tmp_path / "missing"), "--no-plot"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SolutionError, match="nothing to compare in"):
        compare_cli.main([str(tmp_path / "empty"), "--no-plot"])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SolutionError, match="expected a metrics.jsonl"):
        compare_cli.main([str(tmp_path / "x.txt"), "--no-plot"])


# ---------------------------------------------------------------- significance: per-query hits, paired bootstrap

IDS = list(range(100, 108))  # 8 queries
# The best ingredient: a hit at 1/5/10 on queries 0-3, at 10 only on 4-5, none on 6-7.
REF = np.array([[1, 1, 1]] * 4 + [[0, 0, 1]] * 2 + [[0, 0, 0]] * 2, dtype=bool)


def _hits_soup(folder, soup_hits, ids=IDS, ref_hits=REF):
    """A soup folder as the soup run writes it: log, summary, and hits/ files named relative to it."""
    write_hits(folder / "hits" / "ref", ids, ref_hits)
    write_hits(folder / "hits" / "soup", ids, soup_hits)
    ref = {"mean_recall": mean_recall(ref_hits), "hits": "hits/ref.hits.npy"}
    soup = {"members": ["a.pt", "b.pt"], "mean_recall": mean_recall(soup_hits), "hits": "hits/soup.hits.npy"}
    rows = [{"method": "ingredient", "members": ["a.pt"], **ref}, {"method": "ingredient", "members": ["b.pt"]}]
    rows += [{"method": "greedy", "round": 1, "kept": True, **soup}]
    write_jsonl(folder / "soup_log.jsonl", rows)
    summary = {"method": "greedy", "soups": {"greedy": soup}, "best_single": {"path": "a.pt", **ref}}
    write_json(folder / "summary.json", summary)
    return folder


def _trained_run(folder, rows_hits, ids=IDS):
    """A run folder as the trainer writes it: a valid row per hits array, each new best naming its hits."""
    rows, best = [], None
    for i, h in enumerate(rows_hits):
        mr = mean_recall(h)
        rows.append({"step": 10 * (i + 1), "kind": "valid", "set": "valid", "mean_recall": mr})
        if best is None or mr > best:
            best = mr
            write_hits(folder / "hits" / "best", ids, h)
            rows[-1]["hits"] = "hits/best.hits.npy"
    write_jsonl(folder / "metrics.jsonl", rows)
    return folder


def test_a_rewrite_killed_before_its_digest_leaves_readable_hits(tmp_path, monkeypatch):
    write_hits(tmp_path / "x", IDS, REF)

    def killed(path):
        raise KeyboardInterrupt  # the process dies as the new digest is written

    monkeypatch.setattr(hits_format, "atomic_path", killed)
    with pytest.raises(KeyboardInterrupt):
        write_hits(tmp_path / "x", IDS, ~REF)  # a new best: the arrays are rewritten, then the digest
    assert np.array_equal(read_hits(tmp_path / "x")[1], ~REF)  # not "changed since they were written"


def test_hits_round_trip_align_and_bad_files(tmp_path):
    path = write_hits(tmp_path / "x", IDS, REF)
    assert path.name == "x.hits.npy" and (tmp_path / "x.hits.ids.npy").is_file()
    ids, hits = read_hits(path)
    assert ids.tolist() == IDS and hits.dtype == bool and np.array_equal(hits, REF)
    perm = [3, 0, 7, 1, 6, 2, 5, 4]
    shuffled = (np.asarray(IDS)[perm], REF[perm])
    assert np.array_equal(align((np.asarray(IDS), REF), shuffled), REF)  # reordered to a's queries
    assert align((np.asarray(IDS), REF), (np.asarray(IDS[:7] + [999]), REF)) is None  # other queries
    assert align((np.asarray(IDS), REF), (np.asarray(IDS[:7]), REF[:7])) is None
    np.save(tmp_path / "x.hits.ids.npy", np.arange(3))  # 3 ids for 8 rows
    with pytest.raises(SolutionError, match="x.hits.npy"):
        read_hits(tmp_path / "x")
    with pytest.raises(SolutionError, match="cannot read"):
        read_hits(tmp_path / "missing")
    with pytest.raises(ValueError):
        write_hits(tmp_path / "y", IDS[:3], REF)


@pytest.mark.parametrize(
    "queries, hit, diff",  # itself; per-query values +1 on 2 of 8 queries (100 * 2 / 8), or -1 on 4 of 8
    [([], True, 0.0), ([6, 7], True, 25.0), ([0, 1, 2, 3], False, -50.0)],
)
def test_a_system_has_its_difference_and_an_interval_on_that_side(here, queries, hit, diff):
    hits = REF.copy()
    hits[queries] = hit
    _hits_soup(here / "s", hits)
    row = compare.table(compare.collect([here / "s"])).iloc[0]
    assert row["vs_ref"] == diff and row["ci_low"] <= row["vs_ref"] <= row["ci_high"]
    assert (row["ci_low"] >= 0) if diff > 0 else (row["ci_high"] <= 0)
    assert row["significant"] == ("yes" if row["ci_low"] > 0 or row["ci_high"] < 0 else "no")
    assert row["note"] == "vs best ingredient a.pt of s"


def test_csv_carries_the_columns_and_markdown_the_difference_with_its_interval(here):
    _hits_soup(here / "s", np.where(np.arange(8)[:, None] >= 6, True, REF))  # better on queries 6 and 7
    soup = _csv(compare_cli.main(["s", "--csv", "--no-plot"])).iloc[0]
    assert set(significance.COLUMNS) <= set(soup.index)
    vs = f"+25.00 [{float(soup['ci_low']):.2f}, {float(soup['ci_high']):.2f}]"  # +1 on 2 of 8 queries
    md = compare_cli.main(["s", "--no-plot"]).splitlines()
    assert md[2] == f"| s | soup | {float(soup['mean_recall']):.2f} |  |  |  | {vs} |"


def test_rows_on_other_queries_or_with_their_hits_missing_get_no_interval(here):
    _hits_soup(here / "s", REF.copy())
    _hits_soup(here / "t", REF.copy(), ids=[i + 1000 for i in IDS], ref_hits=np.zeros_like(REF))
    _hits_soup(here / "u", REF.copy())
    (here / "u" / "hits" / "soup.hits.npy").unlink()
    df = compare.table(compare.collect([here / "s", here / "t", here / "u"])).set_index("name")
    assert df.loc[["t", "u"], "vs_ref"].isna().all()
    assert df.loc["t", "note"] == "hits on other queries than best ingredient a.pt of s"
    assert df.loc["u", "note"] == "per-query hits file missing"


def test_compare_reads_an_ensemble_folder_with_its_members_as_references(here):
    """An ensemble folder gives its own row and one per member; the ensemble is compared with its best member."""
    ids = list(range(8))
    member_hits = [np.array([[q < 4] * 3 for q in ids]), np.array([[q < 2] * 3 for q in ids])]  # member 0 is best
    fused = np.array([[q < 6] * 3 for q in ids])  # right on two more queries than member 0
    arrays = {"ensemble": fused, "member0": member_hits[0], "member1": member_hits[1]}
    files = {k: write_hits(here / "ens" / "hits" / k, ids, h) for k, h in arrays.items()}
    scores = {"all": {"mean_recall": 75.0}, "select": {"mean_recall": 75.0}, "report": None}
    spec = {
        "members": [{"path": f"m{i}.pt", "fingerprint": f"f{i}", "arch": "ViT-Tiny@RBT-Tiny"} for i in range(2)],
        **{"weights": [0.5, 0.5], "norm": "zscore", "rerank": {"method": "none"}},
        "scores": {**scores, "members": [{"all": {"mean_recall": mean_recall(h)}} for h in member_hits]},
        "hits": {k: str(v.relative_to(here / "ens")) for k, v in files.items()},
    }
    (here / "ens" / "ensemble.json").write_text(json.dumps(spec))
    shutil.copytree(here / "ens", here / "ens2")  # a second ensemble of the same members
    entries = runs.collect(["ens", "ens2"])
    assert [e.kind for e in entries] == ["ensemble", "member", "member"] * 2 and entries[1].name == "m0.pt"
    assert entries[0].scores["mean_recall"] == 75.0 and entries[1].scores["mean_recall"] == 50.0
    cells, expected = significance.columns(entries)[0], paired_bootstrap(fused, member_hits[0])
    assert cells["vs_ref"] == 25.0 == expected.diff
    assert (cells["ci_low"], cells["ci_high"]) == (expected.low, expected.high) and cells["ci_low"] >= 0
    md = compare_cli.main(["ens", "ens2", "--no-plot"]).splitlines()[2:]
    kinds = [["| ens", "ensemble"], ["| ens2", "ensemble"], ["| m0.pt", "member"], ["| m1.pt", "member"]]
    assert [line.split(" | ")[:2] for line in md] == kinds  # each member once


def test_compare_gives_runs_intervals_the_best_run_with_hits_is_the_reference(here):
    worse = REF.copy()
    worse[:4] = False
    _trained_run(here / "a", [worse, REF, worse])  # best at its second validation
    _trained_run(here / "b", [np.zeros_like(REF), worse])
    _trained_run(here / "c", [REF])  # as good as a, listed after it: compared with a, [0, 0]
    _run(here / "old", [99.0])  # a run folder from before hits were stored: the best score, never the reference
    df = pd.read_csv(io.StringIO(compare_cli.main(["a", "b", "c", "old", "--csv", "--no-plot"])))
    rows = dict(zip(df["name"], df.to_dict("records")))
    cells = {name: tuple(rows[name][k] for k in significance.COLUMNS) for name in rows}
    assert cells["a"] == (0.0, 0.0, 0.0, "no", "reference (best single model)")
    assert cells["c"] == (0.0, 0.0, 0.0, "no", "vs a") and rows["a"]["mean_recall"] == mean_recall(REF)
    assert rows["b"]["vs_ref"] == -50.0 and rows["b"]["ci_low"] <= rows["b"]["ci_high"] < 0
    assert cells["b"][3:] == ("yes", "vs a")
    assert pd.isna(rows["old"]["vs_ref"]) and rows["old"]["note"] == "no per-query hits stored"


def test_run_hits_that_do_not_match_the_best_row_are_left_out(tmp_path, caplog):
    run = _trained_run(tmp_path / "a", [REF])
    write_hits(run / "hits" / "best", IDS, np.zeros_like(REF))  # left by a validation a resume dropped
    entry = runs.read_run(run, "a")
    assert entry.hits is None and entry.hits_note == "per-query hits do not match the row"
    (run / "hits" / "best.hits.npy").unlink()
    assert runs.read_run(run, "a").hits_note == "per-query hits file missing"
    assert "per-query hits" in caplog.text

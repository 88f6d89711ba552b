"""Significance in comparisons: per-query hits files (solution.formats.hits) and the paired-bootstrap
columns of the comparison table (solution.report.significance through solution.compare)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest

from solution import compare as compare_cli
from solution.common import SolutionError, write_json, write_jsonl
from solution.formats.hits import align, read_hits, write_hits
from solution.report import folders as runs
from solution.report import significance
from solution.report import table as compare
from solution.retrieval.metrics import mean_recall

IDS = list(range(100, 108))  # 8 queries
# The best ingredient: a hit at 1/5/10 on queries 0-3, at 10 only on 4-5, none on 6-7.
REF = np.array([[1, 1, 1]] * 4 + [[0, 0, 1]] * 2 + [[0, 0, 0]] * 2, dtype=bool)


def _soup(folder, soup_hits, ids=IDS, ref_hits=REF):
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


def _run(folder, mr):
    folder.mkdir(parents=True)
    row = {"step": 10, "epoch": 1, "kind": "valid", "set": "valid", "r1": mr, "r5": mr, "r10": mr, "mean_recall": mr}
    write_jsonl(folder / "metrics.jsonl", [row])
    write_json(folder / "params.json", {"lr": 1e-5})
    return folder


def _csv(text):
    return pd.read_csv(io.StringIO(text), keep_default_na=False)


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


@pytest.fixture(autouse=True)
def _here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # rows are named by their relative paths


@pytest.mark.parametrize(
    "queries, hit, diff",  # itself; per-query values +1 on 2 of 8 queries (100 * 2 / 8), or -1 on 4 of 8
    [([], True, 0.0), ([6, 7], True, 25.0), ([0, 1, 2, 3], False, -50.0)],
)
def test_a_system_has_its_difference_and_an_interval_on_that_side(tmp_path, queries, hit, diff):
    hits = REF.copy()
    hits[queries] = hit
    _soup(tmp_path / "s", hits)
    row = compare.table(compare.collect([tmp_path / "s"])).iloc[0]
    assert row["vs_ref"] == diff and row["ci_low"] <= row["vs_ref"] <= row["ci_high"]
    assert (row["ci_low"] >= 0) if diff > 0 else (row["ci_high"] <= 0)
    assert row["significant"] == ("yes" if row["ci_low"] > 0 or row["ci_high"] < 0 else "no")
    assert row["note"] == "vs best ingredient a.pt of s"


def test_markdown_and_csv_carry_the_columns_rows_without_hits_get_a_note(tmp_path):
    _soup(tmp_path / "s", np.where(np.arange(8)[:, None] >= 6, True, REF))  # better on queries 6 and 7
    _run(tmp_path / "r", 10.0)
    text = compare_cli.main([str(tmp_path / "s"), str(tmp_path / "r"), "--csv", "--no-plot"])
    df = _csv(text)
    assert set(significance.COLUMNS) <= set(df.columns)
    run = df[df["name"].str.endswith("r")].iloc[0]
    assert (run["vs_ref"], run["ci_low"], run["ci_high"], run["significant"]) == ("", "", "", "")
    assert run["note"] == "no per-query hits stored"
    md = compare_cli.main([str(tmp_path / "s"), str(tmp_path / "r"), "--no-plot"]).splitlines()
    soup = df[df["kind"] == "soup"].iloc[0]
    vs = f"+25.00 [{float(soup['ci_low']):.2f}, {float(soup['ci_high']):.2f}]"  # +1 on 2 of 8 queries
    assert md[2] == f"| s | soup | {float(soup['mean_recall']):.2f} |  |  |  | {vs} |"
    assert md[3] == "| r | run | 10.00 | 10.00 | 10.00 | 10.00 |  |"  # no hits: no interval


def test_reference_is_the_best_single_row_with_hits():
    ids = np.asarray(IDS)
    best = runs.Entry("best", "run", {"mean_recall": mean_recall(REF)}, hits=(ids, REF))
    twin = runs.Entry("twin", "trial", {"mean_recall": mean_recall(REF)}, hits=(ids, REF.copy()))
    weak = runs.Entry("weak", "run", {"mean_recall": 0.0}, hits=(ids, np.zeros_like(REF)))
    bare = runs.Entry("bare", "run", {"mean_recall": 99.0})  # no hits: never the reference
    cols = significance.columns([weak, best, twin, bare])
    assert cols[1] == dict(zip(significance.COLUMNS, (0.0, 0.0, 0.0, "no", "reference (best single model)")))
    assert cols[2] == {**cols[1], "note": "vs best"}  # a system equal to the reference: [0, 0]
    assert cols[0]["vs_ref"] == -100 * float(np.mean(REF.mean(axis=1))) and cols[0]["significant"] == "yes"
    assert cols[3] == {**dict.fromkeys(significance.COLUMNS), "note": "no per-query hits stored"}


def test_rows_on_other_queries_or_with_their_hits_missing_get_no_interval(tmp_path):
    _soup(tmp_path / "s", REF.copy())
    _soup(tmp_path / "t", REF.copy(), ids=[i + 1000 for i in IDS], ref_hits=np.zeros_like(REF))
    _soup(tmp_path / "u", REF.copy())
    (tmp_path / "u" / "hits" / "soup.hits.npy").unlink()
    df = compare.table(compare.collect([tmp_path / "s", tmp_path / "t", tmp_path / "u"])).set_index("name")
    assert (
        df.loc[["t", "u"], "vs_ref"].isna().all()
        and df.loc["t", "note"] == "hits on other queries than best ingredient a.pt of s"
    )
    assert df.loc["u", "note"] == "per-query hits file missing"


def test_compare_reads_an_ensemble_folder_with_its_members_as_references(tmp_path):
    """An ensemble folder gives its own row and one per member; the ensemble is compared with its best member."""
    import json

    from solution.stats import paired_bootstrap

    ens = tmp_path / "ens"
    ids = list(range(8))
    member_hits = [np.array([[q < 4] * 3 for q in ids]), np.array([[q < 2] * 3 for q in ids])]  # member 0 is best
    fused = np.array([[q < 6] * 3 for q in ids])  # right on two more queries than member 0
    rel = {"ensemble": write_hits(ens / "hits" / "ensemble", ids, fused)}
    for i, h in enumerate(member_hits):
        rel[f"member{i}"] = write_hits(ens / "hits" / f"member{i}", ids, h)

    def score(h):
        return {"mean_recall": mean_recall(h)}

    spec = {
        "members": [{"path": f"m{i}.pt", "fingerprint": f"f{i}", "arch": "ViT-Tiny@RBT-Tiny"} for i in range(2)],
        "weights": [0.5, 0.5],
        "norm": "zscore",
        "rerank": {"method": "none"},
        "scores": {
            "all": score(fused),
            "select": score(fused),
            "report": None,
            "members": [{"all": score(h)} for h in member_hits],
        },
        "hits": {k: str(v.relative_to(ens)) for k, v in rel.items()},
    }
    (ens / "ensemble.json").write_text(json.dumps(spec))
    shutil.copytree(ens, tmp_path / "ens2")  # a second ensemble of the same members

    entries = runs.collect([ens, tmp_path / "ens2"])
    assert [e.kind for e in entries] == ["ensemble", "member", "member"] * 2 and entries[1].name == "m0.pt"
    assert entries[0].scores["mean_recall"] == 75.0 and entries[1].scores["mean_recall"] == 50.0
    cells = significance.columns(entries)[0]
    expected = paired_bootstrap(fused, member_hits[0])
    assert cells["vs_ref"] == 25.0 == expected.diff
    assert (cells["ci_low"], cells["ci_high"]) == (expected.low, expected.high) and cells["ci_low"] >= 0
    md = compare_cli.main([str(ens), str(tmp_path / "ens2"), "--no-plot"]).splitlines()[2:]
    assert [line.split(" | ")[:2] for line in md] == [["| ens", "ensemble"], ["| ens2", "ensemble"]] + [
        [f"| m{i}.pt", "member"]
        for i in (0, 1)  # each member once
    ]


def _trained_run(folder, rows_hits, ids=IDS):
    """A run folder as the trainer writes it: one main-set valid row per hits array, the new bests
    naming ``hits/best.hits.npy`` (holding the last of them), the others without the key."""
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


def test_compare_gives_runs_intervals_the_best_run_is_the_reference(tmp_path):
    worse = REF.copy()
    worse[:4] = False
    _trained_run(tmp_path / "a", [worse, REF, worse])  # best at its second validation
    _trained_run(tmp_path / "b", [np.zeros_like(REF), worse])
    _run(tmp_path / "old", 10.0)  # a run folder from before hits were stored
    text = compare_cli.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "old"), "--csv", "--no-plot"])
    df = pd.read_csv(io.StringIO(text))
    rows = {n.rstrip("/").split("/")[-1]: r for n, r in zip(df["name"], df.to_dict("records"))}
    assert (rows["a"]["vs_ref"], rows["a"]["ci_low"], rows["a"]["ci_high"]) == (0.0, 0.0, 0.0)
    assert rows["a"]["note"] == "reference (best single model)" and rows["a"]["mean_recall"] == mean_recall(REF)
    assert rows["b"]["vs_ref"] == -50.0 and rows["b"]["ci_high"] <= 0 and rows["b"]["ci_low"] <= rows["b"]["ci_high"]
    assert rows["b"]["note"].startswith("vs ") and rows["b"]["note"].endswith("a")
    assert pd.isna(rows["old"]["vs_ref"]) and rows["old"]["note"] == "no per-query hits stored"


def test_run_hits_that_do_not_match_the_best_row_are_left_out(tmp_path, caplog):
    run = _trained_run(tmp_path / "a", [REF])
    write_hits(run / "hits" / "best", IDS, np.zeros_like(REF))  # left by a validation a resume dropped
    entry = runs.read_run(run, "a")
    assert entry.hits is None and entry.hits_note == "per-query hits do not match the row"
    (run / "hits" / "best.hits.npy").unlink()
    assert runs.read_run(run, "a").hits_note == "per-query hits file missing"
    assert "per-query hits" in caplog.text

"""The offline evaluator against cn_clip's official evaluation.py / evaluation_tr.py, run side by side."""

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_error_line, snapshot
from oracles import random_case

from cn_clip_patch.device import run_upstream_main
from solution.common import SolutionError
from solution.evaluate import main

UPSTREAM = {"t2i": "cn_clip.eval.evaluation", "i2t": "cn_clip.eval.evaluation_tr"}

pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy's, harmless here

KEYS = {"t2i": ("text_id", "image_ids"), "i2t": ("image_id", "text_ids")}


def official(gold, pred, out, direction="t2i"):
    run_upstream_main(UPSTREAM[direction], [gold, pred, out])
    return Path(out).read_bytes()


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("seed", range(4))
def test_valid_submissions_byte_identical_to_official(tmp_path, direction, seed):
    rng = np.random.default_rng(seed)
    gold, pred = random_case(rng, direction, int(rng.integers(1, 80)))
    g, p = write_lines(tmp_path / "gold.jsonl", gold), write_lines(tmp_path / "pred.jsonl", pred)
    expected = official(g, p, tmp_path / "official.json", direction)
    assert json.loads(expected)["success"] is True
    main([str(g), str(p), str(tmp_path / "ours.json")])
    assert (tmp_path / "ours.json").read_bytes() == expected  # same keys, order, and every digit


def test_officially_tolerated_quirks_score_the_same(tmp_path, caplog):
    gold, pred = random_case(np.random.default_rng(7), "t2i", 12)
    unknown = {"text_id": 999_999, "image_ids": list(range(10))}  # ignored
    twice = {**pred[0], "image_ids": list(range(50, 60))}  # a text predicted twice: the later line counts
    g, p = write_lines(tmp_path / "gold.jsonl", gold), write_lines(tmp_path / "pred.jsonl", [*pred, unknown, twice])
    main([str(g), str(p), str(tmp_path / "ours.json")])
    assert (tmp_path / "ours.json").read_bytes() == official(g, p, tmp_path / "official.json")
    assert "already predicted on line 1" in caplog.text and "not among the queries" in caplog.text


GOLD = [{"text_id": 1, "image_ids": [5]}, {"text_id": 2, "image_ids": [6, 7]}]
GOLD_I2T = [{"image_id": 7, "text_ids": [1]}, {"image_id": 8, "text_ids": [2]}]
OK2, OK8 = {"text_id": 2, "image_ids": list(range(10, 20))}, {"image_id": 8, "text_ids": list(range(10))}
MALFORMED = {
    # name: (submission lines (None: no file), words our message must contain[, the gold])
    "unparsable": (['{"text_id": 1, "image_ids": [1,2', OK2], ["line 1", "cannot be parsed"]),
    "blank line": ([{"text_id": 1, "image_ids": list(range(10))}, "", OK2], ["line 2", "cannot be parsed"]),
    "not an object": ([[1, 2, 3], OK2], ["line 1", "not an object"]),
    "missing text_id": ([{"image_ids": list(range(10))}, OK2], ["line 1", "no text_id"]),
    "string text_id": ([{"text_id": "1", "image_ids": list(range(10))}, OK2], ["text_id '1'", "not an integer"]),
    "missing image_ids": ([{"text_id": 1}, OK2], ["text_id 1", "no image_ids"]),
    "image_ids not a list": ([{"text_id": 1, "image_ids": "0123456789"}, OK2], ["text_id 1", "not a list"]),
    "string image id": ([{"text_id": 1, "image_ids": [0, 1, "2", *range(3, 10)]}, OK2], ["rank 3", "not an integer"]),
    "float image id": ([{"text_id": 1, "image_ids": [0, 1, 2.0, *range(3, 10)]}, OK2], ["rank 3", "not an integer"]),
    "too few ids": ([{"text_id": 1, "image_ids": list(range(9))}, OK2], ["text_id 1", "9 image_ids", "exactly 10"]),
    "too many ids": ([{"text_id": 1, "image_ids": list(range(11))}, OK2], ["text_id 1", "11 image_ids"]),
    "duplicate ids": ([{"text_id": 1, "image_ids": [0, 1, 2, 3, 4, 5, 6, 7, 8, 3]}, OK2], ["text_id 1", "repeat 3"]),
    "two problems": ([{"text_id": 1, "image_ids": [1] * 10}, {**OK2, "image_ids": [1]}], ["and 1 more problems"]),
    "missing texts": ([OK2], ["1 text ids", "no prediction: 1"]),
    "empty file": ([], ["2 text ids", "no prediction"]),
    "no file": (None, ["not found"]),
    "bad gold": ([OK2], ["gold", "line 1"], [{"text_id": 1}]),
    "i2t missing image": ([{"image_id": 7, "text_ids": list(range(10))}], ["no prediction: 8"], GOLD_I2T),
    "i2t duplicate ids": ([{"image_id": 7, "text_ids": [1] * 10}, OK8], ["image_id 7", "repeat 1"], GOLD_I2T),
    "i2t string id": ([{"image_id": "7", "text_ids": list(range(10))}, OK8], ["image_id '7'"], GOLD_I2T),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_rejected_like_official_in_one_error_line(tmp_path, capsys, monkeypatch, kind):
    lines, words, gold = (*MALFORMED[kind], GOLD)[:3]
    g, p = write_lines(tmp_path / "gold.jsonl", gold), tmp_path / "pred.jsonl"
    if lines is not None:
        write_lines(p, lines)
    up = json.loads(official(g, p, tmp_path / "official.json", "i2t" if "image_id" in gold[0] else "t2i"))
    code, line = one_error_line(capsys, monkeypatch, main, [str(g), str(p), str(tmp_path / "ours.json")])
    res = json.loads((tmp_path / "ours.json").read_text())
    assert up["success"] is False and res["success"] is False and code == 2 and "submission rejected" in line
    assert list(res) == list(up) and res["score"] == up["score"] == 0 and res["scoreJson"] == {}
    assert all(w in res["errorMsg"] and w in line for w in words), res["errorMsg"]
    assert kind != "two problems" or "text_id 1" in res["errorDetail"] and "text_id 2" in res["errorDetail"]


def test_check_without_answers_reads_query_ids_as_the_official_script_reads_gold(tmp_path, capsys):
    """--texts: the test texts, or the answers themselves (no text field, a repeated text_id: the official reader
    keeps the later line): the submission the official script accepts against that gold passes --check too."""
    texts = write_lines(tmp_path / "test_texts.jsonl", [{"text_id": 1, "text": "a"}, {"text_id": 2, "text": "b"}])
    good = write_lines(tmp_path / "good.jsonl", [{"text_id": 1, "image_ids": list(range(10))}, OK2])
    summary = main(["--check", str(good), "--texts", str(texts)])
    assert summary["success"] is True and summary["queries"] == 2
    assert json.loads(capsys.readouterr().out)["success"] is True
    gold = write_lines(tmp_path / "gold.jsonl", [*GOLD, {"text_id": 2, "image_ids": [8]}])
    assert json.loads(official(gold, good, tmp_path / "up.json"))["success"] is True
    assert main(["--check", str(good), "--texts", str(gold)])["queries"] == 2
    bad = write_lines(tmp_path / "bad.jsonl", [{"text_id": 1, "image_ids": list(range(9))}, OK2])
    with pytest.raises(SolutionError, match="text_id 1 .*9 image_ids"):
        main(["--check", str(bad), "--texts", str(texts)])
    with pytest.raises(SolutionError, match="--texts"):
        main(["--check", str(good)])


BAD_OUT = {
    # name: (OUT relative to the folder holding gold.jsonl and pred.jsonl, words the error must contain)
    "OUT is PRED": ("pred.jsonl", ["pred.jsonl", "one of the inputs"]),
    "OUT is GOLD": ("gold.jsonl", ["gold.jsonl", "one of the inputs"]),
    "OUT is PRED by another spelling": ("sub/../pred.jsonl", ["pred.jsonl", "one of the inputs"]),
    "OUT is a link to GOLD": ("link.json", ["link.json", "one of the inputs"]),
    "OUT is a folder": ("sub", ["sub", "is a folder"]),
    "OUT under a file": ("pred.jsonl/score.json", ["pred.jsonl/score.json", "sits under", "which is a file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_OUT))
def test_output_that_cannot_be_written_is_refused_and_inputs_survive(tmp_path, capsys, monkeypatch, case):
    gold, pred = random_case(np.random.default_rng(11), "t2i", 6)
    g, p = write_lines(tmp_path / "gold.jsonl", gold), write_lines(tmp_path / "pred.jsonl", pred)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(g)
    before = snapshot(tmp_path)
    out, words = BAD_OUT[case]
    code, line = one_error_line(capsys, monkeypatch, main, [str(g), str(p), str(tmp_path / out)])
    assert code == 2 and all(w in line for w in words), line
    assert snapshot(tmp_path) == before  # nothing written

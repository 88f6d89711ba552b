"""The demo report's score table: every row's valid and test recall, each with its paired-bootstrap
difference to the best single model (95% interval over queries), and a paragraph, written from
those numbers, on which differences are real.

Rows come from ``results.json`` (:mod:`solution.demo`): ``{name: {"valid", "test", "kind", "hits":
{"valid", "test"}, "crossfit"?}}``, ``kind`` one of ``base | single | soup | ensemble``. The reference
is the ``single`` row with the best valid mean recall; on test it stays that row (chosen on valid,
so the test comparison is not picked after the fact). Per-query hits of a submission come from the
offline evaluator's own reading of it (:func:`submission_hits`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from solution.common import SolutionError
from solution.formats.hits import align, read_hits, write_hits
from solution.retrieval.metrics import query_hits
from solution.retrieval.official import check_submission, read_gold
from solution.stats import paired_bootstrap

log = logging.getLogger(__name__)

N_RESAMPLES, SEED, CI = 1000, 0, 0.95
PARTS = ("valid", "test")


def submission_hits(submission, answers, base) -> str:
    """Per-query hits (at 1/5/10) of a t2i submission against the gold answers, written to ``base``
    (:func:`solution.formats.hits.write_hits`); returns the hits file's path."""
    gold, direction = read_gold(answers, "t2i")
    checked = check_submission(submission, gold.keys(), direction=direction)
    if checked.problems:
        raise SolutionError(f"{submission}: {checked.problems[0]}")
    return str(write_hits(base, list(gold), query_hits(checked.predictions, gold)))


def reference(results: Mapping[str, dict]) -> str | None:
    """The single model with the best valid mean recall (the name of its row), or None."""
    singles = [k for k, r in results.items() if r.get("kind") == "single"]
    return max(singles, key=lambda k: results[k]["valid"]["mean_recall"]) if singles else None


def intervals(results: Mapping[str, dict], ref: str | None, against: str | None = None) -> dict:
    """``{row: {part: {"diff", "low", "high", "significant"} | None}}``: each row minus ``against``
    (default: the reference) on the same queries, paired bootstrap (1000 resamples, seed 0)."""
    against = against or ref
    out: dict = {}
    for name, r in results.items():
        out[name] = {}
        for part in PARTS:
            mine, other = (r.get("hits") or {}).get(part), (results.get(against, {}).get("hits") or {}).get(part)
            aligned = None
            if mine and other:
                a, b = read_hits(mine), read_hits(other)
                aligned = (a, align(a, b))
            if aligned is None or aligned[1] is None:
                out[name][part] = None
                continue
            bs = paired_bootstrap(aligned[0][1], aligned[1], n_resamples=N_RESAMPLES, seed=SEED, ci=CI)
            out[name][part] = {
                "diff": _z(bs.diff),
                "low": _z(bs.low),
                "high": _z(bs.high),
                "significant": bs.significant,
            }
    return out


def _z(x: float) -> float:
    return round(x, 9) + 0.0  # a difference that is 0 up to float noise prints as +0.00, not -0.00


def _cell(iv: dict | None, is_ref: bool) -> str:
    if is_ref:
        return "reference"
    if iv is None:
        return "n/a"
    mark = " *" if iv["significant"] else ""
    return f"{iv['diff']:+.2f} [{iv['low']:+.2f}, {iv['high']:+.2f}]{mark}"


def score_table(results: Mapping[str, dict], ivs: Mapping[str, dict] | None = None, ref: str | None = None) -> str:
    """The markdown score table (``final`` left out): R@1/5/10 and MR on valid and test, each part with
    its difference to the reference and 95% interval (``*``: the interval excludes 0)."""
    rows = {k: r for k, r in results.items() if k != "final"}
    ref = ref if ref is not None else reference(rows)
    ivs = ivs if ivs is not None else intervals(rows, ref)
    head = (
        "| model | kind | valid R@1 | valid R@5 | valid R@10 | valid MR | valid vs best single [95% CI] "
        "| test R@1 | test R@5 | test R@10 | test MR | test vs best single [95% CI] |"
    )
    lines = [head, "|" + "---|" * 12]
    for name, r in rows.items():
        cells = [name, r.get("kind", "")]
        for part in PARTS:
            s = r[part]
            cells += [f"{s[k]:.2f}" for k in ("r1", "r5", "r10", "mean_recall")]
            cells.append(_cell(ivs.get(name, {}).get(part), name == ref))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _list(items: list[str]) -> str:
    return "; ".join(items) if items else "none"


def _part_words(part: str, ivs: Mapping[str, dict], ref: str) -> str:
    better, worse, same = [], [], []
    for name, iv in ivs.items():
        v = iv.get(part)
        if name == ref or v is None:
            continue
        text = f"{name} ({v['diff']:+.2f} points, [{v['low']:+.2f}, {v['high']:+.2f}])"
        (better if v["significant"] and v["diff"] > 0 else worse if v["significant"] else same).append(
            text if v["significant"] else name
        )
    return (
        f"On {part}, really better than {ref}: {_list(better)}. Really worse: {_list(worse)}. "
        f"Not distinguishable from it (the interval contains 0): {_list(same)}."
    )


def in_words(
    results: Mapping[str, dict], ivs: Mapping[str, dict] | None = None, ref: str | None = None, final: str | None = None
) -> str:
    """A paragraph, generated from the numbers, on which differences to the best single model are real
    (the 95% interval excludes 0) on valid and on test, how each ensemble compares with ``final`` (the
    submitted soup) on test, and the cross-fitted (held-out) valid estimates of the choices made on valid."""
    rows = {k: r for k, r in results.items() if k != "final"}
    ref = ref if ref is not None else reference(rows)
    if ref is None:
        return ""
    ivs = ivs if ivs is not None else intervals(rows, ref)
    n = {p: len(read_hits(rows[ref]["hits"][p])[0]) for p in PARTS if (rows[ref].get("hits") or {}).get(p)}
    parts = [
        f"Each row is compared with the best single model on valid, **{ref}** (valid MR "
        f"{rows[ref]['valid']['mean_recall']:.2f}, test MR {rows[ref]['test']['mean_recall']:.2f}), by a paired "
        f"bootstrap over the same queries ({N_RESAMPLES} resamples; "
        + ", ".join(f"{q} {p} queries" for p, q in n.items())
        + ")."
    ]
    parts += [_part_words(p, ivs, ref) for p in PARTS]
    if final and final in rows:
        vs = intervals(rows, ref, against=final)
        ens = [
            f"{k}: {v['test']['diff']:+.2f} [{v['test']['low']:+.2f}, {v['test']['high']:+.2f}] "
            f"({'real' if v['test']['significant'] else 'not distinguishable'})"
            for k, v in vs.items()
            if rows[k].get("kind") == "ensemble" and v.get("test")
        ]
        if ens:
            parts.append(f"Against the submitted {final} on test: " + "; ".join(ens) + ".")
    cross = [
        f"{k} {c['mean']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"
        for k, r in rows.items()
        if (c := r.get("crossfit")) and c.get("mean") is not None and c.get("low") is not None
    ]
    if cross:
        parts.append(
            "The soups' and ensembles' valid scores are measured on the queries they were chosen on, so "
            "they flatter them; their k-fold cross-fitted valid MR (each fold scored by a choice made "
            "without it, mean with its 95% interval) is the honest estimate: " + "; ".join(cross) + ". "
            "Test queries were used for no choice."
        )
    return "\n\n".join(parts)

"""The demo report's score table (``results.json`` of :mod:`solution.demo`: ``{name: {"valid", "test",
"kind", "hits": {"valid", "test"}, "crossfit"?}}``): valid and test recall with each row's paired
difference to the best single model on valid, and a paragraph on which differences are real.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from solution.common import SolutionError
from solution.formats.hits import read_hits, write_hits
from solution.retrieval.metrics import query_hits
from solution.retrieval.official import check_submission, read_gold

from .significance import N_RESAMPLES, interval

PARTS = ("valid", "test")


def submission_hits(submission, answers, base) -> str:
    """Per-query hits of a t2i submission against the gold answers (the offline evaluator's reading of
    it), written to ``base``; returns the hits file's path."""
    gold, direction = read_gold(answers, "t2i")
    checked = check_submission(submission, gold.keys(), direction=direction)
    if checked.problems:
        raise SolutionError(f"{submission}: {checked.problems[0]}")
    return str(write_hits(base, list(gold), query_hits(checked.predictions, gold)))


def reference(results: Mapping[str, dict]) -> str | None:
    """The single model with the best valid mean recall (the name of its row), or None."""
    singles = [k for k, r in results.items() if r.get("kind") == "single"]
    return max(singles, key=lambda k: results[k]["valid"]["mean_recall"]) if singles else None


def intervals(results: Mapping[str, dict], against: str) -> dict:
    """``{row: {part: BootstrapResult | None}}``: each row minus ``against`` on the same queries."""
    theirs, out = results[against].get("hits") or {}, {}
    for name, r in results.items():
        for part in PARTS:
            mine = (r.get("hits") or {}).get(part)
            b = interval(read_hits(mine), read_hits(theirs[part])) if mine and theirs.get(part) else None
            z = {k: round(getattr(b, k), 9) + 0.0 for k in ("diff", "low", "high")} if b else {}  # no -0.00
            out.setdefault(name, {})[part] = b and dataclasses.replace(b, **z)
    return out


def _cell(b, is_ref: bool) -> str:
    if is_ref or b is None:
        return "reference" if is_ref else "n/a"
    return f"{b.diff:+.2f} [{b.low:+.2f}, {b.high:+.2f}]{' *' if b.significant else ''}"


def score_table(rows: Mapping[str, dict], ivs: Mapping[str, dict], ref: str | None) -> str:
    """R@1/5/10 and MR on valid and test, each part with its difference to the reference and 95%
    interval (``*``: the interval excludes 0)."""
    head = " | ".join(f"{p} R@1 | {p} R@5 | {p} R@10 | {p} MR | {p} vs best single [95% CI]" for p in PARTS)
    lines = [f"| model | kind | {head} |", "|" + "---|" * 12]
    for name, r in rows.items():
        cells = [name, r.get("kind", "")]
        for part in PARTS:
            cells += [f"{r[part][k]:.2f}" for k in ("r1", "r5", "r10", "mean_recall")]
            cells.append(_cell(ivs.get(name, {}).get(part), name == ref))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _part_words(part: str, ivs: Mapping[str, dict], ref: str) -> str:
    better, worse, same = [], [], []
    for name, iv in ivs.items():
        if name != ref and (b := iv.get(part)) is not None:
            text = f"{name} ({b.diff:+.2f} points, [{b.low:+.2f}, {b.high:+.2f}])"
            (same if not b.significant else better if b.diff > 0 else worse).append(text if b.significant else name)
    better, worse, same = ("; ".join(x) or "none" for x in (better, worse, same))
    return (
        f"On {part}, really better than {ref}: {better}. Really worse: {worse}. "
        f"Not distinguishable from it (the interval contains 0): {same}."
    )


def in_words(rows: Mapping[str, dict], ivs: Mapping[str, dict], ref: str | None, final: str | None) -> str:
    """Which differences to the reference are real on valid and on test, how each ensemble compares with
    ``final`` (the submitted soup) on test, and the cross-fitted valid estimates of the choices made on valid."""
    if ref is None:
        return ""
    n = {p: len(read_hits(rows[ref]["hits"][p])[0]) for p in PARTS if (rows[ref].get("hits") or {}).get(p)}
    parts = [
        f"Each row is compared with the best single model on valid, **{ref}** (valid MR "
        f"{rows[ref]['valid']['mean_recall']:.2f}, test MR {rows[ref]['test']['mean_recall']:.2f}), by a paired "
        f"bootstrap over the same queries ({N_RESAMPLES} resamples; "
        + ", ".join(f"{q} {p} queries" for p, q in n.items())
        + ")."
    ]
    parts += [_part_words(p, ivs, ref) for p in PARTS]
    vs = intervals(rows, final) if final in rows else {}
    ens = [
        f"{k}: {b.diff:+.2f} [{b.low:+.2f}, {b.high:+.2f}] ({'real' if b.significant else 'not distinguishable'})"
        for k, v in vs.items()
        if rows[k].get("kind") == "ensemble" and (b := v.get("test"))
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

"""Paired-bootstrap columns of the comparison table: each row's mean-recall difference to the best
single model, with its 95% interval over queries.

The reference is the best row that is not a soup and carries per-query hits; without one, the best
single ingredient of the soups read (from their ``summary.json`` / ``soup_log.jsonl``). Each row with
hits on the same queries gets ``vs_ref`` (its mean recall minus the reference's, points of percent),
``ci_low`` / ``ci_high`` (:func:`solution.stats.paired_bootstrap`: 1000 resamples, seed 0,
percentile interval) and ``significant`` (``yes``, or ``no`` where the interval contains 0); the
``note`` says which row the reference is, or why a row has no interval (no stored hits, other queries).
"""

from __future__ import annotations

from collections.abc import Sequence

from solution.formats.hits import align
from solution.stats import paired_bootstrap

from .folders import Entry

N_RESAMPLES, SEED, CI = 1000, 0, 0.95
COLUMNS = ("vs_ref", "ci_low", "ci_high", "significant", "note")


def reference(entries: Sequence[Entry]) -> dict | None:
    """``{"name", "mean_recall", "hits", "entry"}`` of the best single model with hits, or None."""
    rows = [
        {"name": e.name, "mean_recall": e.scores.get("mean_recall"), "hits": e.hits, "entry": e}
        for e in entries
        if e.kind not in ("soup", "ensemble") and e.hits is not None
    ]
    if not rows:  # no single model in the table has hits: the soups' best ingredient
        seen = {}
        for e in entries:
            ref = e.extra.get("reference")
            if ref and ref["name"] not in seen:
                seen[ref["name"]] = {**ref, "entry": None}
        rows = list(seen.values())
    rows = [r for r in rows if isinstance(r["mean_recall"], (int, float))]
    return max(rows, key=lambda r: r["mean_recall"]) if rows else None


def columns(entries: Sequence[Entry]) -> list[dict]:
    """One dict of :data:`COLUMNS` per entry, in ``entries``' order."""
    ref = reference(entries)
    out = []
    for e in entries:
        cells = dict.fromkeys(COLUMNS)
        if e.hits is None:
            cells["note"] = e.hits_note
        elif ref is None:
            cells["note"] = "no single model with per-query hits to compare with"
        else:
            other = align(e.hits, ref["hits"])
            if other is None:
                cells["note"] = f"hits on other queries than {ref['name']}"
            else:
                b = paired_bootstrap(e.hits[1], other, n_resamples=N_RESAMPLES, seed=SEED, ci=CI)
                cells.update(
                    vs_ref=b.diff,
                    ci_low=b.low,
                    ci_high=b.high,
                    significant="yes" if b.significant else "no",
                    note="reference (best single model)" if e is ref["entry"] else f"vs {ref['name']}",
                )
        out.append(cells)
    return out


def in_words(df) -> str:
    """A sentence on which rows of a comparison table (:func:`solution.report.table.table`) differ
    from the reference for real (the interval excludes 0) and which do not; empty without intervals."""
    rows = [r for _, r in df.iterrows() if r.get("significant") in ("yes", "no")]
    ref = next((str(r["note"])[3:] for r in rows if str(r["note"]).startswith("vs ")), None)
    if ref is None:
        return ""
    real = [
        f"{r['name']} ({r['vs_ref']:+.2f} points, 95% interval [{r['ci_low']:.2f}, {r['ci_high']:.2f}])"
        for r in rows
        if r["significant"] == "yes"
    ]
    not_real = [str(r["name"]) for r in rows if r["significant"] == "no" and str(r["note"]).startswith("vs ")]
    parts = [
        f"Against the best single model ({ref}), paired bootstrap over the validation queries "
        f"({N_RESAMPLES} resamples):"
    ]
    parts.append(
        f"real differences: {'; '.join(real)}." if real else "no difference is real (every interval contains 0)."
    )
    if real and not_real:
        parts.append(f"Not distinguishable from it (interval contains 0): {', '.join(not_real)}.")
    return " ".join(parts)

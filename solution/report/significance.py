"""Paired-bootstrap columns of the comparison table: each row's mean-recall difference to the best
single model, with its 95% interval over the same queries.

The reference is the best row with hits that is not a soup or an ensemble; without one, the best
single ingredient of the soups read. ``note`` says which row the reference is, or why a row has no
interval (no stored hits, other queries).
"""

from __future__ import annotations

from collections.abc import Sequence

from solution.formats.hits import align
from solution.stats import BootstrapResult, paired_bootstrap

from .folders import Entry

N_RESAMPLES, SEED, CI = 1000, 0, 0.95
COLUMNS = ("vs_ref", "ci_low", "ci_high", "significant", "note")


def interval(a: tuple, b: tuple) -> BootstrapResult | None:
    """``a - b`` (each ``(query ids, hits)``) over the same queries; None when the query sets differ."""
    other = align(a, b)
    return None if other is None else paired_bootstrap(a[1], other, n_resamples=N_RESAMPLES, seed=SEED, ci=CI)


def reference(entries: Sequence[Entry]) -> dict | None:
    """``{"name", "mean_recall", "hits", "entry"}`` of the best single model with hits, or None."""
    rows = [
        {"name": e.name, "mean_recall": e.scores.get("mean_recall"), "hits": e.hits, "entry": e}
        for e in entries
        if e.kind not in ("soup", "ensemble") and e.hits is not None
    ]
    if not rows:  # no single model in the table has hits: the soups' best ingredient
        refs = {e.extra["reference"]["name"]: e.extra["reference"] for e in entries if e.extra.get("reference")}
        rows = [{**r, "entry": None} for r in refs.values()]
    rows = [r for r in rows if isinstance(r["mean_recall"], (int, float))]
    return max(rows, key=lambda r: r["mean_recall"]) if rows else None


def columns(entries: Sequence[Entry]) -> list[dict]:
    """One dict of :data:`COLUMNS` per entry, in ``entries``' order."""
    ref, out = reference(entries), []
    for e in entries:
        b = interval(e.hits, ref["hits"]) if e.hits is not None and ref else None
        if b is not None:
            note = "reference (best single model)" if e is ref["entry"] else f"vs {ref['name']}"
            out.append(dict(zip(COLUMNS, (b.diff, b.low, b.high, "yes" if b.significant else "no", note))))
            continue
        out.append(dict.fromkeys(COLUMNS))
        if e.hits is None:
            out[-1]["note"] = e.hits_note
        elif ref is None:
            out[-1]["note"] = "no single model with per-query hits to compare with"
        else:
            out[-1]["note"] = f"hits on other queries than {ref['name']}"
    return out


def in_words(df) -> str:
    """Which rows of a comparison table differ from the reference for real (the interval excludes 0)
    and which do not; empty without intervals."""
    rows = [r for _, r in df.iterrows() if r.get("significant") in ("yes", "no")]
    ref = next((str(r["note"])[3:] for r in rows if str(r["note"]).startswith("vs ")), None)
    if ref is None:
        return ""
    real = [
        f"{r['name']} ({r['vs_ref']:+.2f} points, 95% interval [{r['ci_low']:.2f}, {r['ci_high']:.2f}])"
        for r in rows
        if r["significant"] == "yes"
    ]
    same = [str(r["name"]) for r in rows if r["significant"] == "no" and str(r["note"]).startswith("vs ")]
    head = f"Against the best single model ({ref}), paired bootstrap over the validation queries "
    head += f"({N_RESAMPLES} resamples):"
    if not real:
        return f"{head} no difference is real (every interval contains 0)."
    tail = f" Not distinguishable from it (interval contains 0): {', '.join(same)}." if same else ""
    return f"{head} real differences: {'; '.join(real)}.{tail}"

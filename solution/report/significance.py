"""Paired-bootstrap columns of the comparison table: each row's mean-recall difference to the best single model
(the best row with hits that is not a soup or an ensemble, else the soups' best ingredient), with its 95% interval
over the same queries; ``note`` names the reference, or says why a row has none."""

from __future__ import annotations

from collections.abc import Sequence

from solution.formats.hits import align
from solution.stats import paired_bootstrap

from .folders import Entry

COLUMNS = ("vs_ref", "ci_low", "ci_high", "significant", "note")
REFERENCE = "reference (best single model)"


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
        other = align(e.hits, ref["hits"]) if e.hits is not None and ref else None  # None: other queries
        if other is not None:
            b = paired_bootstrap(e.hits[1], other)
            note = REFERENCE if e is ref["entry"] else f"vs {ref['name']}"
            out.append(dict(zip(COLUMNS, (b.diff, b.low, b.high, "yes" if b.significant else "no", note))))
        elif e.hits is None:
            out.append({**dict.fromkeys(COLUMNS), "note": e.hits_note})
        else:
            why = f"hits on other queries than {ref['name']}" if ref else "no single model with per-query hits"
            out.append({**dict.fromkeys(COLUMNS), "note": why})
    return out

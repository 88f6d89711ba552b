"""The comparison of runs, soups, studies and ensembles (:mod:`.folders`): the full table (CSV: scores over all
validation queries, ``select_mr``/``held_out_mr`` of a soup or ensemble, the paired-bootstrap columns, the
settings that differ), its markdown digest (:data:`MARKDOWN`) and one PNG."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from solution.common import atomic_path, check_output
from solution.plots import save_png

from . import significance
from .folders import SCORES, Entry, collect

log = logging.getLogger(__name__)

MARKDOWN = ("name", "kind", "MR", "R@1", "R@5", "R@10", "vs best single [95% CI]")
PNG_TITLE = "solution.compare"  # in the PNG's metadata: how an earlier plot of compare is recognised
PANELS = (("runs", ("run", "trial")), ("soups", ("soup",)))
OWN_TABLES = (b"best,name,kind,", b"| name | kind | MR |", b"| best | name | kind |")  # CSV, markdown, older


def table(entries: Sequence[Entry]) -> pd.DataFrame:
    """The full comparison table, best first."""
    keys: list[str] = ["method", "members", "alpha"]  # soups' own settings first
    for e in entries:
        keys.extend(k for k in e.settings if k not in keys)
    always = {"method", "members"} if any(e.kind == "soup" for e in entries) else set()
    values = {k: {json.dumps(e.settings[k], default=str) for e in entries if k in e.settings} for k in keys}
    params = [k for k in keys if k in always or len(values[k]) > 1]  # differing between the rows that have them
    rows = [
        {
            "name": e.name,
            "kind": e.kind,
            **{k: e.scores.get(k) for k in SCORES},
            "select_mr": e.extra.get("select_mr"),
            "held_out_mr": e.held_out,
            "step": e.step,
            "vs_best_single": e.extra.get("vs_best_single"),
            **sig,
            **{k: e.settings.get(k) for k in params},
        }
        for e, sig in zip(entries, significance.columns(entries))
    ]
    columns = ["name", "kind", *SCORES, "select_mr", "held_out_mr", "step", "vs_best_single", *significance.COLUMNS]
    df = pd.DataFrame(rows, columns=[*columns, *params])
    df = df.drop(columns=[c for c in ("select_mr", "held_out_mr", "step", "vs_best_single") if df[c].isna().all()])
    df = df.sort_values("mean_recall", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    df.insert(0, "best", ["*" if i == 0 and pd.notna(df.loc[0, "mean_recall"]) else "" for i in range(len(df))])
    return df


def to_markdown(df: pd.DataFrame) -> str:
    """The columns of :data:`MARKDOWN`; a checkpoint that is a member of several ensembles once."""

    def cells(r) -> list[str]:
        scores = ["" if pd.isna(r[k]) else f"{r[k]:.2f}" for k in SCORES]
        vs = "" if pd.isna(r["vs_ref"]) else f"{r['vs_ref']:+.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        vs = "reference" if r["note"] == significance.REFERENCE else vs
        return [str(r["name"]).replace("|", "\\|"), r["kind"], *scores, vs]

    shown = df[~(df["kind"].eq("member") & df["name"].duplicated())]
    lines = ["| " + " | ".join(MARKDOWN) + " |", "|---|---|" + "---:|" * (len(MARKDOWN) - 2)]
    return "\n".join([*lines, *("| " + " | ".join(cells(r)) + " |" for _, r in shown.iterrows())]) + "\n"


def plot(entries: Sequence[Entry], path: str | os.PathLike, max_lines: int = 20) -> Path | None:
    """Mean recall per run over steps (left) and per soup over the candidates it kept (right), atomically."""
    panels = [(kind, [e for e in entries if e.kind in kinds and e.curve]) for kind, kinds in PANELS]
    panels = [(kind, items) for kind, items in panels if items]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (kind, items) in zip(axes[0], panels):
        for e in sorted(items, key=lambda e: -(e.scores.get("mean_recall") or -1))[:max_lines]:
            ax.plot([c[0] for c in e.curve], [c[1] for c in e.curve], "o-", ms=3, label=e.name)
            for x, m, *what in e.curve:  # a soup's point: the member added, the round's merge or the alpha
                ax.annotate(
                    what[0] if what else "", (x, m), fontsize=6, rotation=15, xytext=(2, 3), textcoords="offset points"
                )
        ax.set_xlabel("step" if kind == "runs" else "candidate kept, labelled by what it is")
        ax.set_ylabel("mean recall (%)")
        ax.set_title(f"{kind}: validation mean recall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path, dpi=90, metadata={"Title": PNG_TITLE})


def _head(path: Path, n: int = 4096) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def compare(
    paths: Sequence[str | os.PathLike],
    *,
    csv: bool = False,
    output: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = "compare.png",
) -> str:
    """The markdown digest (or the full table as CSV) over ``paths``; ``output`` gets the full table when it ends
    in ``.csv``, else the digest; the curves go to ``plot_path`` (None: no plot). Outputs are checked first."""
    entries = collect(paths)
    inputs = [f for e in entries for f in e.files]
    if output:
        check_output(output, inputs=inputs, what="--output", own=lambda p: _head(p).startswith(OWN_TABLES))
    if plot_path is not None:
        check_output(plot_path, inputs=[*inputs, output], what="--plot", own=lambda p: PNG_TITLE.encode() in _head(p))
    df = table(entries)
    if output:
        with atomic_path(output) as tmp:
            full = str(output).lower().endswith(".csv")
            tmp.write_text(df.to_csv(index=False) if full else to_markdown(df), encoding="utf-8")
    if plot_path is not None and plot(entries, plot_path):
        log.info("wrote %s", plot_path)
    return df.to_csv(index=False) if csv else to_markdown(df)

"""The comparison of runs, soups, studies and ensembles (:mod:`.folders`): one table (markdown or
CSV) and one PNG.

One row per entry: mean recall and R@1/5/10 over all the validation queries, ``select_mr`` and
``held_out_mr`` (a soup or ensemble: the score it was chosen on and the part held out, or the
cross-fit mean), the step, ``vs_best_single`` (a soup minus its best ingredient on the selection),
the paired-bootstrap columns (:mod:`.significance`) and the settings that differ between rows (or
those asked for); best first, marked ``*``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from solution.common import atomic_path, check_output
from solution.plots import save_png

from . import significance
from .folders import SCORES, Entry, collect

log = logging.getLogger(__name__)

MAX_AUTO_PARAMS = 8
PERCENT = ("select_mr", "held_out_mr", "vs_best_single", "vs_ref", "ci_low", "ci_high")  # points of percent


def table(entries: Sequence[Entry], params: Sequence[str] | None = None) -> pd.DataFrame:
    """The comparison table, best first; ``best`` is ``*`` on the top row."""
    if params is None:  # the settings that differ between rows
        keys: list[str] = ["method", "members", "alpha"]  # soups' own settings first
        for e in entries:
            keys.extend(k for k in e.settings if k not in keys)
        always = {"method", "members"} if any(e.kind == "soup" for e in entries) else set()
        varying = [
            k
            for k in keys  # among the rows that have it: soups have no lr, runs no method
            if k in always or len({json.dumps(e.settings[k], default=str) for e in entries if k in e.settings}) > 1
        ]
        params = varying[:MAX_AUTO_PARAMS]
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
    for col in df.columns.difference([*SCORES, *PERCENT]):  # whole numbers stay whole beside a gap
        vals = df[col].dropna()
        if len(vals) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in vals
        ):
            df[col] = df[col].astype("Int64")
    df = df.sort_values("mean_recall", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    df.insert(0, "best", ["*" if i == 0 and pd.notna(df.loc[0, "mean_recall"]) else "" for i in range(len(df))])
    return df


def to_markdown(df: pd.DataFrame) -> str:
    percent = {*SCORES, *PERCENT}

    def cell(v, col: str) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            if col in percent:
                return f"{v:.2f}"
            return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = list(df.columns)
    aligns = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(cell(r[c], c) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(lines) + "\n"


def plot(entries: Sequence[Entry], path: str | os.PathLike, max_lines: int = 20) -> Path | None:
    """Mean recall per run over steps (left) and per soup over rounds (right), atomically."""
    runs = [e for e in entries if e.kind in ("run", "trial") and e.curve]
    soups = [e for e in entries if e.kind == "soup" and e.curve]
    if not runs and not soups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [x for x in (("runs", runs), ("soups", soups)) if x[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (kind, items) in zip(axes[0], panels):
        items = sorted(items, key=lambda e: -(e.scores.get("mean_recall") or -1))[:max_lines]
        for e in items:
            if kind == "runs":
                ax.plot([s for s, _ in e.curve], [m for _, m in e.curve], "o-", ms=3, label=e.name)
            else:
                xs = [i for i, m, _ in e.curve if m is not None]
                line = ax.plot(xs, [m for _, m, _ in e.curve if m is not None], "o", ms=4, alpha=0.5)[0]
                kept = [(i, m) for i, m, k in e.curve if k and m is not None]
                ax.plot([i for i, _ in kept], [m for _, m in kept], "-", color=line.get_color(), label=e.name)
        ax.set_xlabel("step" if kind == "runs" else "candidate (rounds, then interpolation)")
        ax.set_ylabel("mean recall (%)")
        ax.set_title(f"{kind}: validation mean recall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path, dpi=90)


def compare(
    paths: Sequence[str | os.PathLike],
    *,
    csv: bool = False,
    output: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = "compare.png",
    params: Sequence[str] | None = None,
) -> str:
    """The table over ``paths`` as markdown (or CSV), also written to ``output``; the curves drawn
    into ``plot_path`` (None: no plot). Output paths are checked before anything is written."""
    entries = collect(paths)
    inputs = [f for e in entries for f in e.files]
    if output:  # before anything is written: never over an input, nor a folder
        check_output(output, inputs=inputs, what="--output")
    if plot_path is not None:
        check_output(plot_path, inputs=[*inputs, output], what="--plot")
    df = table(entries, params)
    text = df.to_csv(index=False) if csv else to_markdown(df)
    if output:
        with atomic_path(output) as tmp:
            tmp.write_text(text, encoding="utf-8")
    if plot_path is not None and plot(entries, plot_path):
        log.info("wrote %s", plot_path)
    return text

"""``candidates.csv``, ``candidates.png`` and ``REPORT.md``: every candidate's estimate, the choice and why."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from solution.common import atomic_path
from solution.plots import save_png
from solution.stats import paired_bootstrap

from .evidence import Candidate, rank_key

COLUMNS = ("name", "kind", "valid_mr", "cv_mr", "cv_low", "cv_high", "test_mr", "submitted")


def _rows(cands: list[Candidate], chosen: Candidate) -> list[dict]:
    rows = []
    for c in sorted(cands, key=rank_key):
        mean, low, high = c.cv
        rows.append(
            {
                "name": c.name,
                "kind": c.kind,
                "valid_mr": c.valid_mr,
                "cv_mr": mean,
                "cv_low": low,
                "cv_high": high,
                "test_mr": c.test_mr,
                "submitted": c is chosen,
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else "" if v is None else v) for k, v in r.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    y = list(range(len(rows)))[::-1]
    colors = {"single": "tab:blue", "soup": "tab:green", "ensemble": "tab:purple"}
    for yi, r in zip(y, rows):
        ax.errorbar(
            r["cv_mr"],
            yi,
            xerr=[[r["cv_mr"] - r["cv_low"]], [r["cv_high"] - r["cv_mr"]]],
            fmt="o",
            color=colors[r["kind"]],
            capsize=3,
        )
        if r["test_mr"] is not None:
            ax.plot(r["test_mr"], yi, "x", color="black")
    ax.set_yticks(y, [("* " if r["submitted"] else "") + f"{r['name']} ({r['kind']})" for r in rows])
    ax.set_xlabel("mean recall: cross-fitted estimate with 95% interval (o); test (x)")
    save_png(fig, path)


def write_report(stages, result: dict) -> Path:
    out, cands, chosen = stages.out, result["candidates"], result["chosen"]
    rows = _rows(cands, chosen)
    write_csv(out / "candidates.csv", rows)
    plot(out / "candidates.png", rows)
    singles = sorted((c for c in cands if c.kind == "single"), key=rank_key)
    lines = [
        f"# Pipeline report: {stages.r.source.name}",
        "",
        f"Data `{stages.r.data}`; {len(chosen.hits)} valid queries in {stages.r.folds} folds "
        f"(seed {stages.r.seed}). The test split is never used for a choice.",
        "",
        "## Choice",
        "",
        *result["why"],
        "",
        "## Candidates",
        "",
        "Cross-fitted: each fold scored by a choice made without it (a single model's choice is none). "
        "`vs best single`: paired bootstrap of held-out per-query hits against the best single model.",
        "",
        "| candidate | kind | valid MR | cross-fitted MR [95%] | vs best single | test MR |",
        "|---|---|---:|---|---|---:|",
    ]
    for r in rows:
        c = next(c for c in cands if c.name == r["name"])
        vs = "reference" if singles and c is singles[0] else _vs(c, singles[0]) if singles else ""
        test = "" if r["test_mr"] is None else f"{r['test_mr']:.2f}"
        name = f"**{r['name']}** (submitted)" if r["submitted"] else r["name"]
        lines.append(
            f"| {name} | {r['kind']} | {r['valid_mr']:.2f} | {r['cv_mr']:.2f} "
            f"[{r['cv_low']:.2f}, {r['cv_high']:.2f}] | {vs} | {test} |"
        )
    lines += ["", "![candidates](candidates.png)", ""]
    if chosen.test_mr is not None and singles and chosen is not singles[0]:
        r = paired_bootstrap(chosen.info["test_hits"], singles[0].info["test_hits"])
        v = _boot(chosen, singles[0])
        held = "held" if _verdict(r) == _verdict(v) else "did not hold"
        lines += [
            f"On test, {chosen.name} vs the best single model {singles[0].name}: {r.diff:+.2f} "
            f"[{r.low:+.2f}, {r.high:+.2f}]; the valid estimate's verdict {held}.",
            "",
        ]
    if (out / "inspect" / "submission.html").is_file():
        lines += [
            "The test queries the submission fixes and breaks against the best single model: "
            "[inspect/submission.html](inspect/submission.html).",
            "",
        ]
    lines += _plots(out)
    path = out / "REPORT.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _verdict(r) -> int:
    """Better (1), worse (-1) or not distinguishable (0) by a paired-bootstrap interval."""
    return 1 if r.low > 0 else -1 if r.high < 0 else 0


def _boot(a: Candidate, b: Candidate):
    return paired_bootstrap(a.hits, b.hits)


def _vs(a: Candidate, b: Candidate) -> str:
    r = _boot(a, b)
    return f"{r.diff:+.2f} [{r.low:+.2f}, {r.high:+.2f}]{' *' if r.significant else ''}"


def _plots(out: Path) -> list[str]:
    pngs = sorted(p for p in out.rglob("*.png") if p.name != "candidates.png" and "crossfit" not in p.parts)
    if not pngs:
        return []
    return ["## Plots", "", *(f"- [{p.relative_to(out)}]({p.relative_to(out)})" for p in pngs), ""]

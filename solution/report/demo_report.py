"""``REPORT.md`` of a demo run: the score table with intervals (:mod:`.demo_scores`), the comparison of
its runs, soups, study and ensembles (:mod:`.table`, also in ``compare.md``), the plots, and PCA maps of
a few queries' image and text features before and after fine-tuning.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from solution.common import atomic_path
from solution.ensembles.spec import NAME as ENSEMBLE
from solution.formats.run_files import METRICS
from solution.plots import save_png

from .demo_scores import in_words as scores_in_words
from .demo_scores import intervals, reference, score_table
from .folders import collect
from .significance import in_words
from .table import compare, table

log = logging.getLogger(__name__)


def embedding_map(
    checkpoints: Mapping[str, Path], lmdb_valid: str, out_png: Path, *, n_queries: int = 10, device: str = "cpu"
) -> Path:
    """Side-by-side PCA maps (one per checkpoint) of images (dots) and texts (stars) of ``n_queries``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from solution.data.lmdb_io import LMDBSplit
    from solution.model import load_model
    from solution.retrieval.encode import encode_images, encode_texts

    split = LMDBSplit(lmdb_valid)
    queries = list(split.queries().items())[:n_queries]
    image_ids = sorted({i for _, (_, ids) in queries for i in ids})
    fig, axes = plt.subplots(1, len(checkpoints), figsize=(6 * len(checkpoints), 5.5), squeeze=False)
    cmap = plt.get_cmap("tab10" if n_queries <= 10 else "tab20")
    for ax, (title, ckpt) in zip(axes[0], checkpoints.items()):
        model, config, _ = load_model(ckpt, device=device)
        ids, img = encode_images(model, split, config, image_ids=image_ids, device=device)
        txt = encode_texts(model, [t for _, (t, _) in queries], config, device=device)
        xy = PCA(n_components=2, random_state=0).fit_transform(np.concatenate([img, txt]))
        img_xy, txt_xy = xy[: len(img)], xy[len(img) :]
        pos = {int(i): k for k, i in enumerate(ids)}
        for q, (_, (text, gold)) in enumerate(queries):
            c = cmap(q % cmap.N)
            pts = np.array([img_xy[pos[i]] for i in gold if i in pos])
            if len(pts):
                ax.scatter(pts[:, 0], pts[:, 1], color=c, s=25, alpha=0.8)
            ax.scatter(*txt_xy[q], color=c, marker="*", s=260, edgecolor="black", linewidth=0.6)
        ax.set_title(f"{title}: images (dots) and queries (stars)")
        ax.set_xticks([])
        ax.set_yticks([])
    return save_png(fig, out_png, dpi=90)


def _copy_pngs(src: Path | None, dst: Path, prefix: str) -> list[Path]:
    found = sorted(src.glob("*.png")) if src and src.exists() else []
    for p in found:
        shutil.copyfile(p, dst / f"{prefix}-{p.name}")
    return [dst / f"{prefix}-{p.name}" for p in found]


def write_report(
    out: Path,
    results: Mapping[str, dict],
    *,
    study: Path | None,
    soups: Path | None,
    base: Path,
    final: Path,
    lmdb_valid: str,
    device: str = "cpu",
    elapsed: float | None = None,
    ensembles: Path | None = None,
) -> Path:
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    runs = sorted(p for p in (out / "runs").glob("*") if (p / METRICS).is_file())
    ens = sorted(p.parent for p in ensembles.glob(f"*/{ENSEMBLE}")) if ensembles else []
    sources = [str(p) for p in (*runs, soups, study, *ens) if p]
    table_md = words = ""
    try:
        table_md = compare(sources, plot_path=plots / "compare.png", output=out / "compare.md")
        words = in_words(table(collect(sources)))
    except Exception as e:  # the report still gets written; say what is missing
        log.warning("compare failed: %s", e)
    pngs = [plots / "compare.png"] if (plots / "compare.png").is_file() else []
    pngs += _copy_pngs(study, plots, "search")
    pngs += [
        q
        for prefix, folders in (("ensemble", ens), ("run", runs))
        for f in folders
        for q in _copy_pngs(f, plots, f"{prefix}-{f.name}")
    ]
    maps = {"base (before fine-tuning)": base, "final (greedy soup)": final}
    pngs.append(embedding_map(maps, lmdb_valid, plots / "embedding_map.png", device=device))

    final_row = results.get("final", {})
    rows = {k: r for k, r in results.items() if k != "final"}
    final_name = next((k for k, r in rows.items() if r == final_row), None)
    ref = reference(rows)
    ivs = intervals(rows, ref) if ref else {}
    lines = [
        "# Demo report",
        "",
        "Everything below was produced by `bash scripts/demo.sh` on this machine"
        + (
            f"; this invocation took {elapsed / 60:.1f} minutes (a re-run reuses finished stages, so only a "
            "first run's time is the cost of the whole flow)."
            if elapsed
            else "."
        ),
        "Scores are text->image recall in percent (MUGE metric: MR = mean of R@1, R@5, R@10). "
        "`valid` is the demo's validation split (the soups and ensembles were chosen on it, cross-fitted); "
        "`test` is scored by the offline evaluator against `test_answers.jsonl`, as a submission "
        "(ensembles: `predict --ensemble`).",
        "",
        score_table(rows, ivs, ref),
        "",
        "`vs best single`: the row's mean recall minus the reference's (points of percent) with its 95% "
        "paired-bootstrap interval over the same queries; `*`: the interval excludes 0 (a real difference).",
        "",
        scores_in_words(rows, ivs, ref, final_name),
        "",
        f"Submission: `submissions/demo_test.jsonl` from `{final_row.get('checkpoint', final)}` "
        f"(test MR {final_row.get('test', {}).get('mean_recall', float('nan')):.2f}).",
        "",
    ]
    if table_md:
        lines += [
            "## Runs, soups, search and ensembles (python -m solution.compare)",
            "",
            table_md.strip(),
            "",
            "`vs_ref`: mean-recall difference to the best single model, `ci_low`/`ci_high` its 95% "
            "paired-bootstrap interval over queries, `significant` = no where it contains 0.",
            "",
        ]
        lines += [words, ""] if words else []
    lines += ["## Plots", ""]
    for p in pngs:
        lines += [f"### {p.stem}", f"![{p.stem}](plots/{p.name})", ""]
    report = out / "REPORT.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return report

"""Training curves (PNG): loss (train and validation), mean recall per validation set, logit scale."""

from pathlib import Path

from solution.common import SolutionError, atomic_path
from solution.formats.run_files import MAIN_SET, main_valid

REPORT_TO = ("", "none", "tensorboard")  # open_clip's --report-to, less wandb


def plot_run(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Draw ``metrics.jsonl`` rows into a 3-panel PNG (atomically). None when there is nothing to draw."""
    train = [r for r in rows if r.get("kind") == "train"]
    valid = [r for r in rows if r.get("kind") == "valid"]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r.get("set", MAIN_SET) for r in valid})
    losses = [(train, "loss", "-", "train loss"), (main_valid(rows, key="val_loss"), "val_loss", "o-", "valid loss")]
    panels = {
        "contrastive loss": losses,
        "text->image mean recall (%)": [(main_valid(rows, set_name=s), "mean_recall", "o-", s) for s in sets],
        "logit scale (max 100)": [(train, "logit_scale", "-", None)],
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, curves) in zip(axes, panels.items()):
        for pts, key, style, label in (c for c in curves if c[0]):
            ax.plot([r["step"] for r in pts], [r[key] for r in pts], style, label=label)
        ax.set_xlabel("step")
        ax.set_title(name)
        if any(pts and label for pts, _, _, label in curves):
            ax.legend()
    if title:
        fig.suptitle(title)
    return save_png(fig, path, dpi=80)


def save_png(fig, path, dpi: int = 90, **savefig) -> Path:
    """Lay out, write atomically as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **savefig)
    plt.close(fig)
    return path


def tensorboard(folder):
    """A TensorBoard ``SummaryWriter`` on ``folder`` (``--report-to tensorboard``); one line saying what to install
    when TensorBoard is missing. Close it when done."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SolutionError("--report-to tensorboard needs TensorBoard: pip install -e '.[tensorboard]'") from None
    return SummaryWriter(log_dir=str(folder))


def candidate_scores(folder, series: dict[str, list[float]]) -> None:
    """TensorBoard scalars in ``folder/tensorboard``: each tag's scores of the candidates tried, step i the i-th."""
    writer = tensorboard(Path(folder) / "tensorboard")
    for tag, values in series.items():
        for i, v in enumerate(values):
            writer.add_scalar(tag, float(v), i)
    writer.close()

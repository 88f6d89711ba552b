"""Training curves (PNG): loss (train and validation), mean recall per validation set, logit scale."""

from __future__ import annotations

import logging
from pathlib import Path

from solution.common import SolutionError, atomic_path
from solution.formats.run_files import MAIN_SET, main_valid

log = logging.getLogger(__name__)


def plot_run(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Draw ``metrics.jsonl`` rows into a 3-panel PNG (atomically). None when there is nothing to draw."""
    train = [r for r in rows if r.get("kind") == "train"]
    valid = [r for r in rows if r.get("kind") == "valid"]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    main = main_valid(rows, key="val_loss")
    if main:
        ax.plot([r["step"] for r in main], [r["val_loss"] for r in main], "o-", label="valid loss")
    ax.set_xlabel("step")
    ax.set_title("contrastive loss")
    ax.legend()
    ax = axes[1]
    for name in sorted({r.get("set", MAIN_SET) for r in valid}):
        pts = main_valid(rows, set_name=name)
        ax.plot([r["step"] for r in pts], [r["mean_recall"] for r in pts], "o-", label=name)
    ax.set_xlabel("step")
    ax.set_title("text->image mean recall (%)")
    if valid:
        ax.legend()
    ax = axes[2]
    if train:
        ax.plot([r["step"] for r in train], [r["logit_scale"] for r in train])
    ax.set_xlabel("step")
    ax.set_title("logit scale (max 100)")
    if title:
        fig.suptitle(title)
    return save_png(fig, path, dpi=80)


def save_png(fig, path, dpi: int = 90, **kwargs) -> Path:
    """Lay out, write atomically as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **kwargs)
    plt.close(fig)
    return path


def tensorboard(folder, enabled: bool = True):
    """A TensorBoard ``SummaryWriter`` on ``folder`` (``--report-to tensorboard``), or None when not ``enabled``;
    one line saying what to install when TensorBoard is missing. Close it when done."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SolutionError("--report-to tensorboard needs TensorBoard: pip install -e '.[tensorboard]'") from None
    return SummaryWriter(log_dir=str(folder))

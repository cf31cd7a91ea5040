"""Plots of a training history and a confusion matrix (matplotlib, files only).

One drawing of the curves for every place that shows them: the trial artifacts the dashboard
shows (:func:`curves_figure`) and the export's loss/accuracy/lr PNGs (:func:`history_plots`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# The curves of a training history: (title, history keys, y label, scale, legend corner).
PANELS = (
    ("loss", ("train_loss", "val_loss"), "cross-entropy (nats)", 1.0, "upper right"),
    ("accuracy", ("train_accuracy", "val_accuracy"), "accuracy (%)", 100.0, "lower right"),
    ("learning rate", ("lr",), "learning rate", 1.0, ""),
)


def _draw(ax: Any, history: Sequence[dict[str, Any]], panel: tuple[Any, ...]) -> None:
    """One panel of :data:`PANELS`: train and validation per epoch (NaN where not finite)."""
    name, keys, ylabel, scale, corner = panel
    epochs = [h["epoch"] for h in history]
    for key, colour in zip(keys, ("#1f77b4", "#d62728"), strict=False):
        values = [_finite(h[key]) * scale for h in history]
        ax.plot(epochs, values, marker="o", markersize=3, color=colour, label=key.split("_")[0])
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=8, loc=corner)
    if name == "learning rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def curves_figure(history: Sequence[dict[str, Any]], title: str) -> plt.Figure:
    """Loss, accuracy (%) and learning rate per epoch, train and validation, side by side."""
    # 8.4 x 2.6 in at 90 dpi: about 760 x 230 px, legible as a dashboard thumbnail and full size.
    # A fixed layout and fixed legend corners: constrained layout and loc="best" would triple
    # the cost (about 0.1 s here instead of 0.3 s per trial).
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 2.6), dpi=90)
    fig.subplots_adjust(left=0.075, right=0.99, bottom=0.18, top=0.8, wspace=0.4)
    for ax, panel in zip(axes, PANELS, strict=True):
        _draw(ax, history, panel)
    fig.suptitle(title, fontsize=11)
    return fig


def history_plots(history: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """loss.png, accuracy.png and lr.png: the panels of :func:`curves_figure`, one a file."""
    written = []
    for panel, name in zip(PANELS, ("loss", "accuracy", "lr"), strict=True):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        _draw(ax, history, panel)
        ax.set_title(f"{title}: {panel[0]}")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def confusion_plot(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str
) -> Path:
    cm = np.asarray(matrix)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if len(classes) <= 30:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if cm[i, j] > threshold else "black",
                )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan

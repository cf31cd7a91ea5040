"""Plots of a training history and a confusion matrix, as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def history_plots(history: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """loss.png, accuracy.png and lr.png: train and validation per epoch."""
    epochs = [h["epoch"] for h in history]
    written = []
    for name, keys, ylabel in (
        ("loss", ("train_loss", "val_loss"), "cross-entropy loss"),
        ("accuracy", ("train_accuracy", "val_accuracy"), "accuracy"),
        ("lr", ("lr",), "learning rate"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for key in keys:
            ax.plot(
                epochs,
                [h[key] for h in history],
                marker="o",
                markersize=3,
                label=key.replace("_", " "),
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {name}")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(loc="best")
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

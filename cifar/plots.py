"""Figures for runs and reports (matplotlib Figure objects; no global pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def training_curves(history: Sequence, best_epoch: int | None = None) -> Figure:
    """Loss and accuracy per epoch, train vs validation, with the chosen (best-val) epoch marked."""
    epochs = [m.epoch for m in history]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [m.train_loss for m in history], "o-", label="train")
    ax_loss.plot(epochs, [m.val_loss for m in history], "o-", label="validation")
    ax_loss.set(title="Loss (train includes label smoothing)", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.plot(epochs, [m.train_accuracy for m in history], "o-", label="train (augmented)")
    ax_acc.plot(epochs, [m.val_accuracy for m in history], "o-", label="validation")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"chosen epoch ({best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_matrix_figure(cm: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Counts (left) and row-normalised rates (right)."""
    fig = Figure(figsize=(16, 6.5), layout="constrained")
    ax_counts, ax_rates = fig.subplots(1, 2)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    sns.heatmap(
        cm, annot=True, fmt="d", cmap="Blues", xticklabels=classes, yticklabels=classes, ax=ax_counts, cbar=False
    )
    sns.heatmap(
        rates,
        annot=True,
        fmt=".2f",
        cmap="Blues",
        vmin=0,
        vmax=1,
        xticklabels=classes,
        yticklabels=classes,
        ax=ax_rates,
    )
    ax_counts.set(title=f"{title}: counts", xlabel="predicted", ylabel="true")
    ax_rates.set(title=f"{title}: row-normalised (recall on the diagonal)", xlabel="predicted", ylabel="true")
    return fig

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
    validated = [m for m in history if m.val_loss is not None]  # train.eval_every may skip epochs
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [m.train_loss for m in history], "o-", label="train")
    ax_loss.plot([m.epoch for m in validated], [m.val_loss for m in validated], "o-", label="validation")
    ax_loss.set(title="Loss (train includes label smoothing)", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.plot(epochs, [m.train_accuracy for m in history], "o-", label="train (augmented)")
    ax_acc.plot([m.epoch for m in validated], [m.val_accuracy for m in validated], "o-", label="validation")
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


def per_class_figure(per_class) -> Figure:
    """Precision, recall and F1 per class as grouped bars."""
    data = per_class.melt(id_vars="class", value_vars=["precision", "recall", "f1"], var_name="metric")
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax = fig.subplots()
    sns.barplot(data=data, x="class", y="value", hue="metric", ax=ax)
    low = max(0.0, float(data["value"].min()) - 0.1)
    ax.set(title="Per-class precision, recall and F1 (test split)", xlabel="", ylabel="score", ylim=(low, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def reliability_diagram(bins, ece: float, subtitle: str = "") -> Figure:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax, ax_count = fig.subplots(1, 2, width_ratios=[3, 2])
    used = bins[bins["count"] > 0]
    width = float(bins["high"].iloc[0] - bins["low"].iloc[0])
    ax.bar(used["low"], used["accuracy"], width=width, align="edge", edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(used["confidence"], used["accuracy"], "o", color="C3", ms=4, label="mean confidence")
    ax.set(
        title=f"Reliability diagram (ECE {ece:.3f})" + (f"\n{subtitle}" if subtitle else ""),
        xlabel="confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left")
    ax_count.bar(used["low"], used["count"], width=width, align="edge", color="C0", edgecolor="black")
    ax_count.set(title="Images per confidence bin", xlabel="confidence", ylabel="images", xlim=(0, 1), yscale="log")
    return fig


def misclassified_gallery(rows, images: np.ndarray, columns: int = 8) -> Figure:
    """The misclassified test images, highest loss first, with true and predicted labels."""
    count = max(1, len(rows))
    n_rows = -(-count // columns)
    height = n_rows * 1.9 + 0.5
    fig = Figure(figsize=(columns * 1.6, height))
    # A uniform grid: fixed margins place it as well as constrained layout does, at a fraction of
    # the cost (laying out 40 titled axes took most of a run's report time).
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.75 / height, wspace=0.08, hspace=0.45)
    axes = np.atleast_1d(fig.subplots(n_rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, rows.itertuples()):
        ax.imshow(images[row.index], interpolation="nearest")
        ax.set_title(f"true {row.true}\npred {row.predicted} {row.confidence:.0%}", fontsize=8)
    fig.suptitle("Misclassified test images, highest loss first (least probability on the true class)")
    return fig


def ood_score_histogram(scores: dict[str, np.ndarray], threshold: float, accept_rate: float) -> Figure:
    """The served graph's ood_score for test images and each out-of-distribution set, with the threshold."""
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    everything = np.log10(np.maximum(np.concatenate(list(scores.values())), 1e-6))
    bins = np.logspace(everything.min(), everything.max(), 80)  # log bins: noise sits decades to the right
    for name, values in scores.items():
        label = "CIFAR-10 test" if name == "test" else name.replace("_", " ")
        share = np.full(len(values), 1 / max(len(values), 1))  # each set sums to 1 over its log-width bins
        ax.hist(values, bins=bins, weights=share, alpha=0.5, label=label)
    ax.axvline(threshold, color="black", ls="--", label=f"threshold (accepts {accept_rate:.0%} of validation)")
    ax.set_xscale("log")
    ax.set(
        title="Out-of-distribution score: right of the line = 'none of the 10 classes'",
        xlabel="ood_score (Mahalanobis distance to the nearest class, per feature; log scale)",
        ylabel="share of the set's images",
    )
    ax.legend()
    return fig


def corruption_figure(table) -> Figure:
    """Accuracy against severity per corruption (``table``: corruption, severity, accuracy; severity 0 = clean)."""
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    clean = float(table.loc[table["severity"] == 0, "accuracy"].iloc[0])
    for name, rows in table[table["severity"] > 0].groupby("corruption"):
        ax.plot(rows["severity"], rows["accuracy"], "o-", label=name.replace("_", " "))
    ax.axhline(clean, color="black", ls="--", label=f"clean ({clean:.1%})")
    ax.set(
        title="Test accuracy under common corruptions (CIFAR-10-C style, generated)",
        xlabel="severity",
        ylabel="accuracy",
        xticks=[1, 2, 3, 4, 5],
        ylim=(0, 1),
    )
    ax.legend(loc="lower left", ncols=2)
    ax.grid(alpha=0.3)
    return fig

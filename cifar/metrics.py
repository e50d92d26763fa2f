"""Classification metrics as pure NumPy functions (pandas only for the tables)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` counts images of true class ``i`` predicted as ``j``."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_report(cm: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(0).astype(float), cm.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return pd.DataFrame(
        {"class": list(classes), "precision": precision, "recall": recall, "f1": f1, "support": actual.astype(int)}
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def most_confused_pairs(cm: np.ndarray, classes: Sequence[str], top: int = 10) -> pd.DataFrame:
    """The largest off-diagonal counts: (true, predicted, count, share of the true class)."""
    off = cm.astype(float).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None)[:top]
    rows = []
    for flat in order:
        i, j = divmod(int(flat), cm.shape[1])
        if off[i, j] <= 0:
            break
        rows.append(
            {
                "true": classes[i],
                "predicted": classes[j],
                "count": int(cm[i, j]),
                "share_of_true": cm[i, j] / max(1, cm[i].sum()),
            }
        )
    return pd.DataFrame(rows, columns=["true", "predicted", "count", "share_of_true"])


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Confidence vs accuracy in equal-width confidence bins (for ECE and reliability diagrams)."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == np.asarray(labels)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        rows.append(
            {
                "low": edges[b],
                "high": edges[b + 1],
                "count": int(mask.sum()),
                "confidence": float(confidence[mask].mean()) if mask.any() else np.nan,
                "accuracy": float(correct[mask].mean()) if mask.any() else np.nan,
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Sum over bins of (share of images) x |accuracy - confidence|."""
    table = calibration_bins(probabilities, labels, bins)
    used = table[table["count"] > 0]
    return float((used["count"] / len(labels) * (used["accuracy"] - used["confidence"]).abs()).sum())


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(picked, 1e-12, 1)).mean())

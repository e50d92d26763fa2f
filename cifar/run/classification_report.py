"""The evaluation report: what a model gets right and wrong on labelled images, as figures and tables.

Pure: the served model's probabilities and the labels in, a report and its files out. Every
training run writes one (``evaluation/``, through ``cifar.run.results``); ``python -m cifar evaluate``
makes one for a logged or registered model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cifar.metrics import (
    calibration_bins,
    confusion_matrix,
    expected_calibration_error,
    most_confused_pairs,
    negative_log_likelihood,
    per_class_report,
)


@dataclass
class EvaluationReport:
    accuracy: float
    confusion: np.ndarray
    per_class: pd.DataFrame
    confused_pairs: pd.DataFrame
    calibration: pd.DataFrame
    ece: float
    nll: float
    misclassified: pd.DataFrame  # index, true, predicted, confidence, loss (highest loss first)
    classes: tuple[str, ...]

    def metrics(self, prefix: str = "test_") -> dict[str, float]:
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}ece": self.ece, f"{prefix}nll": self.nll}


def build_report(probabilities: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> EvaluationReport:
    """The report of a served model's calibrated ``probabilities`` (the graph's output) on labelled images."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = probabilities.argmax(1)
    cm = confusion_matrix(labels, predictions, len(classes))
    wrong = np.flatnonzero(predictions != labels)
    loss = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1))
    order = wrong[np.argsort(-loss[wrong], kind="stable")]
    misclassified = pd.DataFrame(
        {
            "index": order,
            "true": [classes[i] for i in labels[order]],
            "predicted": [classes[i] for i in predictions[order]],
            "confidence": probabilities[order].max(1),
            "loss": loss[order],
        }
    )
    return EvaluationReport(
        accuracy=float((predictions == labels).mean()),
        confusion=cm,
        per_class=per_class_report(cm, classes),
        confused_pairs=most_confused_pairs(cm, classes),
        calibration=calibration_bins(probabilities, labels),
        ece=expected_calibration_error(probabilities, labels),
        nll=negative_log_likelihood(probabilities, labels),
        misclassified=misclassified,
        classes=tuple(classes),
    )


def report_figures(report: EvaluationReport, images: np.ndarray) -> dict[str, Any]:
    """name -> matplotlib Figure."""
    # lazy: seaborn takes ~1.5 s; `evaluate --help` imports this module and skips it
    from cifar.plots import (
        confusion_matrix_figure,
        misclassified_gallery,
        per_class_figure,
        reliability_diagram,
    )

    return {
        "confusion_matrix.png": confusion_matrix_figure(report.confusion, report.classes, "Test split"),
        "per_class_metrics.png": per_class_figure(report.per_class),
        "reliability_diagram.png": reliability_diagram(report.calibration, report.ece),
        "misclassified.png": misclassified_gallery(report.misclassified.head(40), images),
    }


def write_report(report: EvaluationReport, images: np.ndarray, folder: Path) -> Path:
    """Write the figures and tables of a report into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, figure in report_figures(report, images).items():
        figure.savefig(folder / name)
    tables = {
        "per_class.csv": report.per_class,
        "most_confused_pairs.csv": report.confused_pairs,
        "calibration_bins.csv": report.calibration,
        "misclassified.csv": report.misclassified.head(200),
    }
    for name, table in tables.items():
        table.to_csv(folder / name, index=False, float_format="%.4f")
    (folder / "confusion_matrix.json").write_text(
        json.dumps({"matrix": report.confusion.tolist(), "classes": list(report.classes)})
    )
    return folder

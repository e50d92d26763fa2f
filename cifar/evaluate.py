"""The evaluation report: what a model gets right and wrong on the test split, as figures and tables.

Logged by every training run (``evaluation/``) and by ``python -m cifar.evaluate --model-uri URI``,
which scores a logged or registered model as a new run linked to its model version.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cifar.cli import run_cli
from cifar.metrics import (
    calibration_bins,
    confusion_matrix,
    expected_calibration_error,
    most_confused_pairs,
    negative_log_likelihood,
    per_class_report,
)
from cifar.tracking.names import mlflow_metrics


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


def log_report(report: EvaluationReport, images: np.ndarray, folder: str = "evaluation") -> None:
    """Log the figures and tables of a report to the active MLflow run."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(write_report(report, images, Path(tmp) / folder)), folder)


def evaluate_model_uri(model_uri: str, data_dir: Path | None = None, experiment: str = "evaluation") -> str:
    """Score a logged/registered model on the test split; log the report as a new run. Returns its id."""
    import mlflow

    from cifar.data import ensure_cache
    from cifar.inference import Predictor
    from cifar.tracking import check_tracking_store

    check_tracking_store()
    predictor = Predictor.from_uri(model_uri)
    data = ensure_cache(data_dir)
    images, labels = np.asarray(data.images["test"]), data.labels["test"]
    report = build_report(predictor.probabilities(images), labels, tuple(predictor.classes))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"evaluate {model_uri}") as run:
        mlflow.set_tags({"evaluated_model_uri": model_uri, "data_digest": data.digest})
        mlflow.log_metrics(mlflow_metrics(report.metrics()))
        log_report(report, images)
        version = _model_version(model_uri)
        if version is not None:
            mlflow.set_tags({"registered_model_name": version.name, "registered_model_version": version.version})
            mlflow.MlflowClient().set_model_version_tag(
                version.name, version.version, "evaluation_run_id", run.info.run_id
            )
    print(f"test accuracy {report.accuracy:.4f}, ECE {report.ece:.4f}; report in run {run.info.run_id}")
    return run.info.run_id


def _model_version(model_uri: str):
    """The registry version behind a models:/name@alias or models:/name/N URI, if any."""
    import mlflow

    if not model_uri.startswith("models:/") or model_uri.startswith("models:/m-"):
        return None
    name, _, ref = model_uri.removeprefix("models:/").partition("/")
    client = mlflow.MlflowClient()
    if "@" in name:
        name, alias = name.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    return client.get_model_version(name, ref) if ref.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-uri", default="models:/cifar10-classifier@production")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--experiment", default="evaluation", help="MLflow experiment for the report run")
    args = parser.parse_args(argv)
    evaluate_model_uri(args.model_uri, args.data_dir, args.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Score a logged or registered model on the test split, as a run linked to its model version.

    python -m cifar evaluate --model-uri models:/cifar10-classifier@production

The report itself (figures and tables) is ``cifar.run.classification_report``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from cifar.cli import run_cli
from cifar.contract.registered_model import (
    PRODUCTION_URI,
    VersionTags,
    model_name,
    production_uri,
    registered_version,
)
from cifar.data import ensure_cache
from cifar.run.classification_report import EvaluationReport, build_report, report_figures, write_report  # noqa: F401 (re-exported)
from cifar.serve.inference import Predictor
from cifar.tracking import check_tracking_store
from cifar.tracking.names import mlflow_metrics
from cifar.tracking.store import _mlflow


def log_report(report: EvaluationReport, images: np.ndarray, folder: str = "evaluation") -> None:
    """Log the figures and tables of a report to the active MLflow run."""
    with tempfile.TemporaryDirectory() as tmp:
        _mlflow().log_artifacts(str(write_report(report, images, Path(tmp) / folder)), folder)


def evaluate_model_uri(
    model_uri: str, data_dir: Path | None = None, experiment: str = "evaluation", dataset: str = ""
) -> str:
    """Score a logged/registered model on the test split; log the report as a new run. Returns its id."""
    mlflow = _mlflow()
    check_tracking_store()
    predictor = Predictor.from_uri(model_uri)
    data = ensure_cache(data_dir, dataset=dataset)
    images, labels = np.asarray(data.images["test"]), data.labels["test"]
    report = build_report(predictor.probabilities(images), labels, tuple(predictor.classes))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"evaluate {model_uri}") as run:
        mlflow.set_tags({"evaluated_model_uri": model_uri, "data_digest": data.digest})
        mlflow.log_metrics(mlflow_metrics(report.metrics()))
        log_report(report, images)
        version = registered_version(model_uri)
        if version is not None:
            mlflow.set_tags({"registered_model_name": version.name, "registered_model_version": version.version})
            for key, value in VersionTags(evaluation_run_id=run.info.run_id).to_tags().items():
                mlflow.MlflowClient().set_model_version_tag(version.name, version.version, key, value)
    print(f"test accuracy {report.accuracy:.4f}, ECE {report.ece:.4f}; report in run {run.info.run_id}")
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-uri", help=f"default: the dataset's production model ({PRODUCTION_URI})")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--dataset", default="", help="a prepared dataset other than CIFAR-10 (its data and model)")
    parser.add_argument("--experiment", default="evaluation", help="MLflow experiment for the report run")
    args = parser.parse_args(argv)
    model_uri = args.model_uri or production_uri(model_name(args.dataset))
    evaluate_model_uri(model_uri, args.data_dir, args.experiment, args.dataset)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""``python -m cifar robustness --model-uri URI``: test accuracy under common corruptions.

Seven corruptions (``cifar.assess.corruptions``) at five severities are generated on the fly from the
test split (CIFAR-10-C style); the table and plot are logged as an MLflow run linked to the model
version (tag ``robustness_run_id``), whose ``mean_corruption_accuracy`` tag the registry shows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cifar.assess.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from cifar.cli import run_cli
from cifar.contract.registered_model import (
    PRODUCTION_URI,
    VersionTags,
    model_name,
    production_uri,
    registered_version,
)
from cifar.data import ensure_cache
from cifar.serve.inference import Predictor
from cifar.tracking import check_tracking_store
from cifar.tracking.store import _mlflow


def sample_test_split(data, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` test images with classes in proportion (all of them when count is 0 or larger)."""
    images, labels = np.asarray(data.images["test"]), np.asarray(data.labels["test"])
    if 0 < count < len(labels):
        pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:count])
        images, labels = images[pick], labels[pick]
    return images, labels


def corruption_table(
    classes_of: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray, seed: int = 0
) -> pd.DataFrame:
    """Accuracy per corruption and severity; the clean accuracy is the row with severity 0.

    ``classes_of`` maps uint8 images to predicted class indices (``Predictor.predicted_classes``).
    """
    rows = [{"corruption": "clean", "severity": 0, "accuracy": float((classes_of(images) == labels).mean())}]
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            corrupted = corrupt(images, name, severity, seed=seed + severity)
            accuracy = float((classes_of(corrupted) == labels).mean())
            rows.append({"corruption": name, "severity": severity, "accuracy": accuracy})
    return pd.DataFrame(rows)


def mean_corruption_accuracy(table: pd.DataFrame) -> float:
    return float(table.loc[table["severity"] > 0, "accuracy"].mean())


def robustness_report(
    model_uri: str, data_dir: Path | None = None, count: int = 2000, experiment: str = "robustness", dataset: str = ""
) -> tuple[pd.DataFrame, str]:
    """Measure, print and log the corruption table of a model. Returns (table, MLflow run id)."""
    from cifar.plots import corruption_figure  # lazy: seaborn takes ~1.5 s; `robustness --help` skips it

    mlflow = _mlflow()
    check_tracking_store()
    predictor = Predictor.from_uri(model_uri)
    data = ensure_cache(data_dir, dataset=dataset)
    images, labels = sample_test_split(data, count)
    table = corruption_table(predictor.predicted_classes, images, labels)
    mean = mean_corruption_accuracy(table)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"robustness {model_uri}") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tags({"evaluated_model_uri": model_uri, "data_digest": data.digest, "images": str(len(labels))})
        metrics = {"clean_accuracy": float(table["accuracy"].iloc[0]), "mean_corruption_accuracy": mean}
        for name, rows in table[table["severity"] > 0].groupby("corruption"):
            metrics[f"corruption_accuracy_{name}"] = float(rows["accuracy"].mean())
        mlflow.log_metrics({f"robustness/{k}": v for k, v in metrics.items()})
        folder = Path(tmp) / "robustness"
        folder.mkdir()
        table.to_csv(folder / "corruption_accuracy.csv", index=False, float_format="%.4f")
        corruption_figure(table).savefig(folder / "corruption_accuracy.png")
        mlflow.log_artifacts(str(folder), "robustness")
        version = registered_version(model_uri)
        if version is not None:
            client = mlflow.MlflowClient()
            mlflow.set_tags({"registered_model_name": version.name, "registered_model_version": version.version})
            tags = VersionTags(robustness_run_id=run.info.run_id, mean_corruption_accuracy=mean)
            for key, value in tags.to_tags().items():
                client.set_model_version_tag(version.name, version.version, key, value)
    wide = table[table["severity"] > 0].pivot(index="corruption", columns="severity", values="accuracy")
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    print(
        f"clean accuracy {table['accuracy'].iloc[0]:.4f}; mean corruption accuracy {mean:.4f} "
        f"({len(labels):,} test images); report in run {run.info.run_id}"
    )
    return table, run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar robustness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-uri", help=f"default: the dataset's production model ({PRODUCTION_URI})")
    parser.add_argument("--images", type=int, default=2000, help="test images per condition (0: all 10,000)")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--dataset", default="", help="a prepared dataset other than CIFAR-10 (its data and model)")
    parser.add_argument("--experiment", default="robustness", help="MLflow experiment for the report run")
    args = parser.parse_args(argv)
    model_uri = args.model_uri or production_uri(model_name(args.dataset))
    robustness_report(model_uri, args.data_dir, args.images, args.experiment, args.dataset)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

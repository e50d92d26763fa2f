"""Metric names on MLflow: ``train/``, ``val/``, ``test/``, ``ood/`` ... sections.

The MLflow UI groups a run's charts into sections by the part of a name before ``/``, so the
code's names (``val_accuracy``, ``best_val_accuracy``) are published as ``val/accuracy``,
``val/best_accuracy``. (Runs logged before 2026-12-02 used the code names on MLflow too; they
are no longer read: train them again.)
"""

from __future__ import annotations

from collections.abc import Mapping

SECTIONS = ("train", "val", "test", "ood", "int8", "trials")  # a code name "<section>_rest" becomes "<section>/rest"
RENAMED = {  # code names without a section prefix
    "best_val_accuracy": "val/best_accuracy",
    "best_epoch": "val/best_epoch",  # the epoch chosen on validation
    "learning_rate": "train/learning_rate",
    "images_per_second": "train/images_per_second",
    "epoch_seconds": "train/epoch_seconds",
    "temperature": "calibration/temperature",
    "onnx_max_abs_diff": "export/onnx_max_abs_diff",
}
_CODE = {v: k for k, v in RENAMED.items()}


def metric_key(name: str) -> str:
    """The MLflow name of a code metric name (a name that already has a section is kept)."""
    if "/" in name:
        return name
    if name in RENAMED:
        return RENAMED[name]
    section, _, rest = name.partition("_")
    return f"{section}/{rest}" if section in SECTIONS and rest else name


def mlflow_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {metric_key(k): v for k, v in metrics.items()}


def code_name(key: str) -> str:
    """The code name of an MLflow metric name (``val/best_accuracy`` -> ``best_val_accuracy``)."""
    if key in _CODE:
        return _CODE[key]
    section, _, rest = key.partition("/")
    return f"{section}_{rest}" if rest and section in SECTIONS else key


def code_names(metrics: Mapping[str, float]) -> dict[str, float]:
    return {code_name(k): v for k, v in metrics.items()}

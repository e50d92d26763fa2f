"""The tracking store: where runs go, reaching it, and the ONNX model flavour every run logs.

Store: ``$MLFLOW_TRACKING_URI`` when set (a team server), else MLflow 3's embedded default,
``sqlite:///mlflow.db`` with artifacts in ``./mlruns``.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import numpy as np

from cifar.config import PROJECT_ROOT
from cifar.errors import CifarError

MODEL_ARTIFACT = "model"
TRIAL_RUN_ATTR = "mlflow_run_id"  # Optuna trial attribute: the trial's MLflow run


def _mlflow():
    import mlflow

    return mlflow


def check_tracking_store() -> str:
    """Fail early, with the URI tried, if the tracking server cannot be reached."""
    mlflow = _mlflow()
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            source = "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the tracking URI"
            raise CifarError(
                f"cannot reach the MLflow tracking server at {uri} (from {source}): {type(exc).__name__}. "
                "Start the server, or unset MLFLOW_TRACKING_URI to log to the local store (mlflow.db here)."
            ) from None
    else:
        from cifar.locks import sqlite_lock

        # Two processes creating a new SQLite store at once race on its tables: one at a time.
        with sqlite_lock(uri, "init"):
            mlflow.MlflowClient().search_experiments(max_results=1)
    return uri


def git_state() -> dict[str, str]:
    """The commit the code came from, and whether tracked files differed from it."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:  # not a repository, or no commit yet
            return {"git_commit": "unknown", "git_dirty": "unknown"}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": head.stdout.strip(), "git_dirty": str(dirty).lower()}


def onnx_signature(num_classes: int):
    """``image``: float32 N x 3 x 32 x 32 in [0, 1] -> ``logits``: float32 N x classes."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 32, 32), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")]),
    )


def log_onnx_model(proto, metadata: dict[str, Any], example: np.ndarray, run_id: str | None = None) -> str:
    """Log an ONNX model as an MLflow model of ``run_id`` (default: the active run); no torch, no pickle."""
    mlflow = _mlflow()

    info = mlflow.onnx.log_model(
        proto,
        name=MODEL_ARTIFACT,
        signature=onnx_signature(len(metadata["classes"])),
        input_example={"image": example},
        metadata=metadata,
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
        **({"run_id": run_id} if run_id else {}),
    )
    return info.model_uri


def redact_url(url: str) -> str:
    """Hide a password in a database URL before it is printed or logged."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url

"""The tracking store: where runs go, reaching it, and the ONNX model flavour every run logs.

Store: ``$MLFLOW_TRACKING_URI`` when set (a team server), else MLflow 3's embedded default,
``sqlite:///mlflow.db`` with artifacts in ``./mlruns``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import requests
import yaml

from cifar.config import PROJECT_ROOT
from cifar.errors import CifarError
from cifar.locks import sqlite_lock
from cifar.tracking.names import mlflow_metrics

MODEL_ARTIFACT = "model"
TRIAL_RUN_ATTR = "mlflow_run_id"  # Optuna trial attribute: the trial's MLflow run


def _mlflow():
    """The ``mlflow`` module, imported on first use; the modules that use MLflow get it from here."""
    import mlflow  # lazy: ~1 s; the app's start, predict's warm cache and every command's --help skip it

    return mlflow


def ping_tracking_server(uri: str) -> None:
    """A tracking server's ``/health`` answers, or a CifarError naming the URI and what to do."""
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        source = "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the tracking URI"
        raise CifarError(
            f"cannot reach the MLflow tracking server at {uri} (from {source}): {type(exc).__name__}. "
            "Start the server, or unset MLFLOW_TRACKING_URI to log to the local store (mlflow.db here)."
        ) from None


def check_tracking_store() -> str:
    """Fail early, with the URI tried, if the tracking store cannot be reached (a new SQLite store gets its tables)."""
    mlflow = _mlflow()
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        ping_tracking_server(uri)
    else:
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


def onnx_signature(proto):
    """The model's MLflow signature, read from the graph itself: each input and output, its dtype and shape.

    The graph is the contract (``cifar.contract.schema``): what it declares is what any client gets.
    """
    from onnx.helper import tensor_dtype_to_np_dtype  # lazy: onnx takes ~0.8 s; the app and --help skip it

    schema = _mlflow().types.schema

    def spec(value):
        tensor = value.type.tensor_type
        dtype = tensor_dtype_to_np_dtype(tensor.elem_type)
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return schema.TensorSpec(np.dtype(str) if dtype == np.dtype(object) else dtype, shape, value.name)

    return _mlflow().models.ModelSignature(
        inputs=schema.Schema([spec(v) for v in proto.graph.input]),
        outputs=schema.Schema([spec(v) for v in proto.graph.output]),
    )


def _model_kwargs(proto, metadata: dict[str, Any], example: np.ndarray) -> dict[str, Any]:
    """What every saved or logged model of the project has: environment, signature, metadata.

    ``example``: real images for the graph's (first) input, the input example MLflow stores and serves.
    """
    mlflow = _mlflow()
    return {
        # what inference would find (it loads the model in a subprocess: 2.4 s on every run)
        "pip_requirements": [*mlflow.onnx.get_default_pip_requirements(), f"numpy=={np.__version__}"],
        "signature": onnx_signature(proto),
        "input_example": {proto.graph.input[0].name: np.asarray(example, np.uint8)},
        "metadata": metadata,
        "save_as_external_data": False,
        "onnx_execution_providers": ["CPUExecutionProvider"],
    }


def log_onnx_model(
    proto, metadata: dict[str, Any], example: np.ndarray, run_id: str | None = None, name: str = MODEL_ARTIFACT
) -> str:
    """Log an ONNX model as an MLflow model of ``run_id`` (default: the active run); no torch, no pickle."""
    mlflow = _mlflow()
    info = mlflow.onnx.log_model(
        proto, name=name, **_model_kwargs(proto, metadata, example), **({"run_id": run_id} if run_id else {})
    )
    return info.model_uri


def save_onnx_model_folder(proto, metadata: dict[str, Any], example: np.ndarray, folder) -> Any:
    """The same MLflow model as ``log_onnx_model``, written to a local folder (must be absent or empty)."""
    folder = Path(folder)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # MLflow creates the folder itself
    _mlflow().onnx.save_model(proto, str(folder), **_model_kwargs(proto, metadata, example))
    return folder


def replace_logged_model(model_id: str, proto, metadata: dict[str, Any], example: np.ndarray) -> None:
    """Rewrite a logged model's files in place (refitted constants, or a format conversion).

    Every registered version of that model serves the new files. The model keeps its identity
    (id, run, creation time, from its MLmodel file); a tag records the rewrite, which is also a
    write to the store, so copies in ``cifar.serve.modelcache`` are fetched again.
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    location = client.get_logged_model(model_id).artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/MLmodel", dst_path=f"{tmp}/old"))
        folder = save_onnx_model_folder(proto, metadata, example, Path(tmp) / "model")
        identity = {k: v for k, v in (yaml.safe_load(old.read_text()) or {}).items() if k in _IDENTITY}
        new = {**(yaml.safe_load((folder / "MLmodel").read_text()) or {}), **identity}
        (folder / "MLmodel").write_text(yaml.safe_dump(new, sort_keys=False))
        client.log_model_artifacts(model_id, str(folder))
    client.set_logged_model_tags(model_id, {"rewritten_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


_IDENTITY = ("artifact_path", "model_id", "run_id", "utc_time_created", "model_uuid")


def log_derived_model(
    run_id: str,
    onnx_path,
    metadata: dict[str, Any],
    example: np.ndarray,
    *,
    artifact: str,
    uri_tag: str,
    metrics: dict[str, float],
) -> str:
    """A second model of a finished run (e.g. its int8 version): logged, its figures and a tag pointing to it."""
    import onnx  # lazy: ~0.8 s; the app and --help skip it

    mlflow = _mlflow()
    uri = log_onnx_model(onnx.load(str(onnx_path)), metadata, example, run_id=run_id, name=artifact)
    client = mlflow.MlflowClient()
    for key, value in mlflow_metrics(metrics).items():  # linked to this model, beside the run's own
        client.log_metric(run_id, key, value, model_id=uri.removeprefix("models:/"))
    client.set_tag(run_id, uri_tag, uri)
    return uri


def redact_url(url: str) -> str:
    """Hide a password in a database URL before it is printed or logged."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url

"""A run's outbox: everything a training run logs is written to disk first, then uploaded.

``mlflow-outbox/<run_id>/`` (or ``$CIFAR_OUTBOX/<run_id>``) holds::

    run.json            run id and tracking URI
    metrics.jsonl       one line per logged batch of metrics (epoch metrics, final metrics)
    artifacts/<path>/   files for the run's artifact folders (plots, evaluation, weights, ...)
    model/              model.onnx + metadata.json + example.npy: logged as the run's MLflow model
    finish.json         the run's end: status and last tags
    progress.json       what has been uploaded already (so a retry never duplicates)

``push`` uploads whatever is staged and not yet sent, in that order, and removes the folder once
the run's end is recorded on the server. While the server is away nothing is lost: training
goes on, and the next push (the next epoch, the end of the run, or ``python -m cifar sync``)
sends the rest.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cifar.settings import settings
from cifar.tracking.store import _mlflow, log_onnx_model


def outbox_root() -> Path:
    return settings().outbox


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)  # atomic: a crash leaves the old file or the new one


class Outbox:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.artifacts = self.folder / "artifacts"
        self.model_dir = self.folder / "model"
        self._lock = threading.Lock()
        self.logged_model_uri: str | None = None  # remembered after a finished run's folder is gone

    @classmethod
    def create(cls, run_id: str, tracking_uri: str, root: Path | None = None) -> Outbox:
        box = cls((root or outbox_root()) / run_id)
        box.folder.mkdir(parents=True, exist_ok=True)
        _write_json(box.folder / "run.json", {"run_id": run_id, "tracking_uri": tracking_uri})
        return box

    @property
    def run(self) -> dict[str, str]:
        return json.loads((self.folder / "run.json").read_text())

    @property
    def finished(self) -> bool:
        return (self.folder / "finish.json").exists()

    # --- staging (local files only: cheap, never fails on a network) ---------------------------
    def add_metrics(
        self, metrics: dict[str, float], step: int = 0, *, of_model: bool = False, datasets: dict | None = None
    ) -> None:
        """Stage metrics; ``of_model``: linked to the run's model once it is logged (MLflow's model view).

        ``datasets`` maps a name's section (``"val"``) to the ``(name, digest)`` of the dataset it was
        measured on, as logged with the run's inputs.
        """
        line = {"step": step, "timestamp": int(time.time() * 1000), "metrics": metrics}
        if of_model:
            line |= {"of_model": True, "datasets": datasets or {}}
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def artifact_dir(self, path: str) -> Path:
        folder = self.artifacts / path
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def stage_model(self, folder: Path) -> None:
        """Stage a model folder (``model.onnx``, ``metadata.json``, ``example.npy``) as the run's model."""
        tmp = self.folder / "model.tmp"
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        tmp.replace(self.model_dir)  # atomic: a push sees the whole model or none

    def finish(self, status: str, tags: dict[str, str]) -> None:
        _write_json(self.folder / "finish.json", {"status": status, "tags": tags})

    # --- uploading ----------------------------------------------------------------------------
    def _progress(self) -> dict[str, Any]:
        path = self.folder / "progress.json"
        return json.loads(path.read_text()) if path.exists() else {"metric_lines": 0, "artifacts": []}

    def push(self, *, include_end: bool = True, metrics_only: bool = False) -> bool:
        """Upload what is pending; True when nothing is left (the folder is then gone once finished).

        Raises whatever the tracking client raises when the server cannot be reached; what was
        sent before the failure is recorded and not sent again.
        """
        with self._lock:
            if not self.folder.exists():
                return True
            return self._push(include_end, metrics_only)

    def _push(self, include_end: bool, metrics_only: bool) -> bool:
        mlflow = _mlflow()
        run_id = self.run["run_id"]
        client = mlflow.MlflowClient()
        progress = self._progress()
        lines = (
            (self.folder / "metrics.jsonl").read_text().splitlines() if (self.folder / "metrics.jsonl").exists() else []
        )
        for number in range(progress["metric_lines"], len(lines)):
            entry = json.loads(lines[number])
            model_id = None
            if entry.get("of_model"):  # the model's own figures: sent linked to it, so after it
                if metrics_only:
                    return False
                if self.model_dir.exists() and not progress.get("model_uri"):
                    progress["model_uri"] = self._log_model(run_id)
                    _write_json(self.folder / "progress.json", progress)
                if not progress.get("model_uri") and not self.finished:
                    break  # its model is still to come
                model_id = (progress.get("model_uri") or "").removeprefix("models:/") or None
            batch = [_metric(k, v, entry, model_id) for k, v in entry["metrics"].items()]
            client.log_batch(run_id, metrics=batch, synchronous=True)
            progress["metric_lines"] = number + 1
            _write_json(self.folder / "progress.json", progress)
        if metrics_only:  # while training: artifacts may still be being written
            return False
        if self.artifacts.exists():
            for folder in sorted(p for p in self.artifacts.iterdir() if p.is_dir()):
                if folder.name not in progress["artifacts"]:
                    client.log_artifacts(run_id, str(folder), folder.name)
                    progress["artifacts"].append(folder.name)
                    _write_json(self.folder / "progress.json", progress)
        if self.model_dir.exists() and not progress.get("model_uri"):
            progress["model_uri"] = self._log_model(run_id)
            _write_json(self.folder / "progress.json", progress)
        if progress.get("model_uri") and not progress.get("model_tagged"):
            client.set_tag(run_id, "model_uri", progress["model_uri"])
            progress["model_tagged"] = True
            _write_json(self.folder / "progress.json", progress)
        self.logged_model_uri = progress.get("model_uri")
        if not include_end or not self.finished:
            return False
        end = json.loads((self.folder / "finish.json").read_text())
        for key, value in end["tags"].items():
            client.set_tag(run_id, key, value)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(end["status"])
        else:
            client.set_terminated(run_id, end["status"])
        shutil.rmtree(self.folder, ignore_errors=True)
        return True

    @property
    def model_uri(self) -> str | None:
        return self._progress().get("model_uri") if self.folder.exists() else self.logged_model_uri

    def _log_model(self, run_id: str) -> str:
        import onnx  # lazy: ~0.8 s; the app and --help skip it

        proto = onnx.load(str(self.model_dir / "model.onnx"))
        metadata = json.loads((self.model_dir / "metadata.json").read_text())
        example = np.load(self.model_dir / "example.npy")
        return log_onnx_model(proto, metadata, example, run_id=run_id)


def _metric(key: str, value: float, entry: dict[str, Any], model_id: str | None):
    name, digest = (entry.get("datasets") or {}).get(key.partition("/")[0], (None, None)) if model_id else (None, None)
    return _mlflow().entities.Metric(key, float(value), entry["timestamp"], entry["step"], model_id, name, digest)


def pending_runs(root: Path | None = None) -> list[Outbox]:
    root = root or outbox_root()
    if not root.exists():
        return []
    return [Outbox(p) for p in sorted(root.iterdir()) if (p / "run.json").exists()]

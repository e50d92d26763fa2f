"""The only module that talks to MLflow about runs: what a training run logs, and how.

Store: ``$MLFLOW_TRACKING_URI`` when set (a team server), else MLflow 3's embedded default,
``sqlite:///mlflow.db`` with artifacts in ``./mlruns``. Per-epoch metrics go out
asynchronously; figures, weights and the ONNX model are logged after the training clock stops.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from cifar.config import PROJECT_ROOT, ExperimentConfig
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


class TrainingRun:
    """Context manager around one MLflow run of a training.

    Joins the run that ``mlflow run`` created (``$MLFLOW_RUN_ID``) instead of making a second;
    an exception ends the run FAILED with its traceback as an artifact, Ctrl-C ends it KILLED.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.experiment_name = experiment_name or cfg.name
        self.run_name = run_name
        self.tags = tags or {}
        self.nested = nested
        self.parent_run_id = parent_run_id
        self.run_id: str | None = None
        self.model_uri: str | None = None

    def __enter__(self) -> TrainingRun:
        mlflow = _mlflow()
        check_tracking_store()
        if self.parent_run_id:  # a child lives in its parent's experiment, whoever created the parent
            mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(self.parent_run_id).info.experiment_id)
        elif not os.environ.get("MLFLOW_RUN_ID"):
            mlflow.set_experiment(self.experiment_name)
        run = mlflow.start_run(run_name=self.run_name, nested=self.nested, parent_run_id=self.parent_run_id)
        self.run_id = run.info.run_id
        if self.run_name:
            mlflow.set_tag("mlflow.runName", self.run_name)
        mlflow.set_tags({**git_state(), **self.tags})
        mlflow.log_params(self.cfg.flat())
        mlflow.log_text(self.cfg.to_yaml(), "config/experiment.yaml")
        self.tensorboard = TensorBoardLog(self.experiment_name, self.run_name or "run", self.run_id)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        mlflow = _mlflow()
        self.tensorboard.close_and_log()
        pruned = exc_type is not None and exc_type.__name__ == "TrialPruned"  # optuna.TrialPruned
        if "optuna_trial" in self.tags:
            mlflow.set_tag("trial_state", "COMPLETE" if exc_type is None else "PRUNED" if pruned else "FAIL")
        if exc_type is None:
            mlflow.end_run("FINISHED")
            return False
        if pruned:  # stopped early on purpose: not a failure
            mlflow.set_tag("pruned", str(exc))
            mlflow.end_run("KILLED")
            return False
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            mlflow.log_text("".join(traceback.format_exception(exc_type, exc, tb)), "error/traceback.txt")
            mlflow.set_tag("error", f"{exc_type.__name__}: {exc}"[:5000])
        finally:
            mlflow.end_run(status)
        return False

    # --- what a training run logs ----------------------------------------------------------
    def log_data(self, data, source: str) -> None:
        """Params for the split sizes and dataset lineage (the cache digest) for each split."""
        mlflow = _mlflow()
        sizes = data.sizes()
        mlflow.log_params({f"data.{split}_size": n for split, n in sizes.items()})
        mlflow.set_tags({"data_source": source, "data_digest": data.digest})
        contexts = {"train": "training", "val": "validation", "test": "testing"}
        for split, context in contexts.items():
            dataset = mlflow.data.from_numpy(
                np.asarray(data.images[split]),
                targets=np.asarray(data.labels[split]),
                name=f"cifar10-{split}",
                digest=f"{data.digest[:10]}-{split}{sizes[split]}",
            )
            mlflow.log_input(dataset, context=context, tags={"images": str(sizes[split]), "source": source})

    def log_epoch(self, metrics) -> None:
        _mlflow().log_metrics(metrics.as_dict(), step=metrics.epoch, synchronous=False)
        self.tensorboard.epoch(metrics)

    def log_results(self, *, fit, test, model, data, metadata: dict[str, Any]) -> None:
        """Final metrics, evaluation figures, safetensors weights and the ONNX MLflow model."""
        from cifar.evaluate import build_report, log_report
        from cifar.export import export_onnx, onnx_parity, save_weights
        from cifar.plots import training_curves

        mlflow = _mlflow()
        mlflow.flush_async_logging()
        report = build_report(test.logits, test.labels, data.classes)
        mlflow.log_metrics(
            {
                "best_val_accuracy": fit.best_val_accuracy,
                "best_epoch": fit.best_epoch,
                "test_loss": test.loss,
                "train_seconds": fit.train_seconds,
                **report.metrics(),
            }
        )
        mlflow.log_figure(training_curves(fit.history, fit.best_epoch), "plots/training_curves.png")
        log_report(report, np.asarray(data.images["test"]))
        self.tensorboard.results(
            self.cfg, data, report, {**report.metrics(), "best_val_accuracy": fit.best_val_accuracy}
        )

        metadata = {
            **metadata,
            "run_id": self.run_id,
            "val_accuracy": fit.best_val_accuracy,
            "test_accuracy": test.accuracy,
        }
        with tempfile.TemporaryDirectory() as tmp:
            save_weights(model, Path(tmp) / "weights", metadata)
            mlflow.log_artifacts(str(Path(tmp) / "weights"), "weights")
            proto = export_onnx(model, Path(tmp) / "model.onnx", metadata)
        sample = np.asarray(data.images["val"][:64]).transpose(0, 3, 1, 2).astype(np.float32) / 255
        parity = onnx_parity(model, proto, sample, tta=bool(metadata.get("tta")))
        mlflow.log_metric("onnx_max_abs_diff", parity)
        if parity > 1e-3:
            raise CifarError(f"the exported ONNX model disagrees with PyTorch (max |diff| {parity:.2e}).")
        self.model_uri = log_onnx_model(proto, metadata, sample[:2])
        mlflow.set_tag("model_uri", self.model_uri)


def onnx_signature(num_classes: int):
    """``image``: float32 N x 3 x 32 x 32 in [0, 1] -> ``logits``: float32 N x classes."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 32, 32), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")]),
    )


def log_onnx_model(proto, metadata: dict[str, Any], example: np.ndarray) -> str:
    """Log an ONNX model as an MLflow model (loads with pyfunc, no torch, no pickle)."""
    mlflow = _mlflow()

    info = mlflow.onnx.log_model(
        proto,
        name=MODEL_ARTIFACT,
        signature=onnx_signature(len(metadata["classes"])),
        input_example={"image": example},
        metadata=metadata,
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
    )
    return info.model_uri


class TensorBoardLog:
    """TensorBoard event files for a run, in ``runs/<experiment>/<run>`` and as run artifacts.

    ``tensorboard --logdir runs`` shows every local run; the same files are under the run's
    ``tensorboard/`` artifacts for anyone browsing the tracking server.
    """

    def __init__(self, experiment: str, run_name: str, run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(os.environ.get("CIFAR_TENSORBOARD_DIR", "runs")) / experiment / f"{run_name}-{run_id[:8]}"
        self.writer = SummaryWriter(str(self.logdir))

    def epoch(self, m) -> None:
        for name, value in (
            ("loss/train", m.train_loss),
            ("loss/val", m.val_loss),
            ("accuracy/train", m.train_accuracy),
            ("accuracy/val", m.val_accuracy),
            ("learning_rate", m.learning_rate),
            ("images_per_second", m.images_per_second),
        ):
            self.writer.add_scalar(name, value, m.epoch)

    def results(self, cfg: ExperimentConfig, data, report, final: dict[str, float]) -> None:
        import torch
        from torchvision.utils import make_grid

        from cifar.data.loader import Augmentation, augment_batch, images_to_tensor
        from cifar.plots import confusion_matrix_figure

        spread = np.linspace(0, len(data.labels["train"]) - 1, 64).astype(int)
        sample = images_to_tensor(np.asarray(data.images["train"])[spread], "cpu").float() / 255
        generator = torch.Generator().manual_seed(cfg.train.seed)
        augmented = augment_batch(
            sample, Augmentation(cfg.augment.flip, cfg.augment.translate, cfg.augment.cutout), generator
        )
        self.writer.add_image("augmented_batch", make_grid(augmented, nrow=8, padding=1), 0)
        self.writer.add_figure(
            "confusion_matrix", confusion_matrix_figure(report.confusion, data.classes, "Test split"), 0
        )
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.flat().items()}
        self.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")

    def close_and_log(self) -> None:
        self.writer.close()
        try:
            _mlflow().log_artifacts(str(self.logdir), "tensorboard")
        except Exception as exc:  # the run's own status matters more than its TensorBoard copy
            print(f"warning: could not upload TensorBoard files: {exc}")


# --- studies (cifar.search) -----------------------------------------------------------------
def redact_url(url: str) -> str:
    """Hide a password in a database URL before it is printed or logged."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def close_run(run_id: str, status: str, tags: dict[str, str]) -> None:
    client = _mlflow().MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


def study_parent_run(study, attr: str, experiment: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """The one MLflow parent run of a study, shared by every worker through a study attribute.

    Under ``mlflow run -e tune`` the run it created is the parent. Two workers that start at
    once may both create one: the attribute decides, and the loser deletes its own.
    """
    import time

    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    existing = study.user_attrs.get(attr)
    if existing:
        try:
            client.get_run(existing)
            return existing
        except mlflow.exceptions.MlflowException:  # the study outlived its run (another store, deleted)
            print(
                f"The study's MLflow parent run {existing} is not in {mlflow.get_tracking_uri()}: starting a new one."
            )
    # Under `mlflow run` its run is the parent. Take the id out of the environment, or every
    # trial's start_run(parent_run_id=...) would resume that run instead of nesting under it.
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if not run_id:
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        run_id = client.create_run(experiment_id, run_name=f"{experiment}-study", tags=tags).info.run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    if study.user_attrs.get(attr) in (None, existing):
        study.set_user_attr(attr, run_id)
    time.sleep(0.5)
    winner = study.user_attrs.get(attr)
    if winner != run_id:
        client.delete_run(run_id)
    return winner


def summarize_study(study, parent_run_id: str) -> None:
    """Best trial (value, params) and Optuna's plots (matplotlib, offline) on the parent run."""
    import time
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    client.log_batch(
        parent_run_id,
        metrics=[
            mlflow.entities.Metric(f"trials_{state.lower()}", states.count(state), int(time.time() * 1000), 0)
            for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
        ],
    )
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        client.log_metric(parent_run_id, "best_val_accuracy", best.value)
        client.set_tag(parent_run_id, "best_trial", str(best.number))
        if best.user_attrs.get(TRIAL_RUN_ATTR):
            client.set_tag(parent_run_id, "best_run_id", best.user_attrs[TRIAL_RUN_ATTR])
        client.log_dict(
            parent_run_id, {"number": best.number, "value": best.value, "params": best.params}, "optuna/best_trial.json"
        )
    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
        "slice": ovm.plot_slice,
        "intermediate_values": ovm.plot_intermediate_values,
    }
    for name, plot in plots.items():
        if not completed:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances need varied params
            continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.figure
        figure.set_size_inches(max(figure.get_size_inches()[0], 9), max(figure.get_size_inches()[1], 5))
        client.log_figure(parent_run_id, figure, f"optuna/{name}.png", save_kwargs={"bbox_inches": "tight"})
        plt.close(figure)
    if not any(state == "RUNNING" for state in states):
        client.set_terminated(parent_run_id, "FINISHED")

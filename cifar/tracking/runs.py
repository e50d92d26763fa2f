"""One training run in MLflow: params, per-epoch metrics, results, the model, TensorBoard files.

Per-epoch metrics are written to the run's outbox and sent by a background thread; figures,
weights and the ONNX model are staged there after the training clock stops, then uploaded. If
the tracking server is away, training goes on and the outbox keeps everything for
``python -m cifar sync`` (see ``cifar.tracking.outbox``).
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cifar.config import ExperimentConfig
from cifar.errors import CifarError, Pruned
from cifar.settings import settings
from cifar.tracking.names import mlflow_metrics
from cifar.tracking.outbox import Outbox
from cifar.tracking.store import _mlflow, check_tracking_store, git_state

# A server outage should cost seconds per call, not MLflow's default of minutes of retries:
# whatever fails stays in the outbox and goes out on the next push.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class TrainingRun:
    """Context manager around one MLflow run of a training.

    Joins the run that ``mlflow run`` created (``$MLFLOW_RUN_ID``) instead of making a second;
    an exception ends the run FAILED with its traceback as an artifact, Ctrl-C ends it KILLED.
    The run must be reachable at the start; after that everything goes through its outbox.
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
        resume_run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.resume_run_id = resume_run_id
        self.experiment_name = experiment_name or cfg.name
        self.run_name = run_name
        self.tags = tags or {}
        self.nested = nested
        self.parent_run_id = parent_run_id
        self.run_id: str | None = None
        self._pusher = None
        self._pending = None
        self._warned = False
        self.end_tags: dict[str, str] = {}  # set with the run's end (through the outbox)
        self.datasets: dict[str, tuple[str, str]] = {}  # split -> (name, digest) of the logged inputs

    def __enter__(self) -> TrainingRun:
        mlflow = _mlflow()
        uri = check_tracking_store()
        if uri.startswith(("http://", "https://")):
            for key, value in HTTP_RETRY_DEFAULTS.items():
                os.environ.setdefault(key, value)
        if self.resume_run_id:
            return self._resume(uri)
        if self.parent_run_id:  # a child lives in its parent's experiment, whoever created the parent
            mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(self.parent_run_id).info.experiment_id)
        elif not os.environ.get("MLFLOW_RUN_ID"):
            experiment = mlflow.set_experiment(self.experiment_name)
            # MLflow 3.17's set_experiment, when another process creates the experiment first,
            # returns it without making it active, and the run would land in Default: set it by id.
            mlflow.set_experiment(experiment_id=experiment.experiment_id)
        run = mlflow.start_run(
            run_name=self.run_name,
            nested=self.nested,
            parent_run_id=self.parent_run_id,
            log_system_metrics=system_metrics_enabled(),
        )
        self.run_id = run.info.run_id
        if self.run_name:
            mlflow.set_tag("mlflow.runName", self.run_name)
        mlflow.set_tags({**git_state(), **self.tags})
        mlflow.log_params(self.cfg.flat())
        try:  # the first artifact: an artifact store that cannot be written fails here, not after training
            mlflow.log_text(self.cfg.to_yaml(), "config/experiment.yaml")
        except OSError as exc:
            mlflow.end_run("FAILED")
            raise CifarError(
                f"cannot write the artifact store {run.info.artifact_uri}: {exc.strerror or exc}. Fix its "
                "permissions or space, or use an experiment whose artifact location is writable."
            ) from None
        self.outbox = Outbox.create(self.run_id, uri)
        self.tensorboard = TensorBoardLog(self.experiment_name, self.run_name or "run", self.run_id)
        return self

    def _resume(self, uri: str) -> TrainingRun:
        """Continue an interrupted run: same run id, params and datasets already logged."""
        mlflow = _mlflow()
        try:
            previous = mlflow.MlflowClient().get_run(self.resume_run_id)
        except mlflow.exceptions.MlflowException:
            raise CifarError(f"run {self.resume_run_id} is not in the tracking store {uri}.") from None
        if previous.info.status == "FINISHED":
            raise CifarError(f"run {self.resume_run_id} finished; there is nothing to resume.")
        run = mlflow.start_run(run_id=self.resume_run_id, log_system_metrics=system_metrics_enabled())
        self.run_id = run.info.run_id
        self.run_name = previous.info.run_name
        mlflow.set_tag("resumed", "true")
        self.outbox = Outbox.create(self.run_id, uri)
        self.tensorboard = TensorBoardLog(previous.info.experiment_id, self.run_name or "run", self.run_id)
        return self

    def log_checkpoint(self, path: Path) -> None:
        """Stage a checkpoint as the run's ``checkpoint/`` artifact (uploaded with the run's end)."""
        shutil.copy2(path, self.outbox.artifact_dir("checkpoint") / path.name)

    def __exit__(self, exc_type, exc, tb) -> bool:
        tags: dict[str, str] = dict(self.end_tags)
        pruned = exc_type is not None and issubclass(exc_type, Pruned)  # stopped by a search's pruner
        if "optuna_trial" in self.tags:
            tags["trial_state"] = "COMPLETE" if exc_type is None else "PRUNED" if pruned else "FAIL"
        if exc_type is None:
            status = "FINISHED"
        elif pruned:  # stopped early on purpose: not a failure
            status, tags["pruned"] = "KILLED", str(exc)
        else:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            (self.outbox.artifact_dir("error") / "traceback.txt").write_text(text)
            tags["error"] = f"{exc_type.__name__}: {exc}"[:5000]
        self.tensorboard.close_into(self.outbox.artifact_dir("tensorboard"))
        self.outbox.finish(status, tags)
        if not self.push():
            if _mlflow().active_run() is not None:  # leave no active run behind (tune runs many)
                try:
                    _mlflow().end_run(status)  # pops the run first, then tries the server
                except Exception:
                    pass  # the outbox holds the end; sync records it
            print(
                f"Run {self.run_id} is not on the tracking server yet: its results are kept in {self.outbox.folder}. "
                f"Upload them with `python -m cifar sync` once {self.outbox.run['tracking_uri']} answers.",
                flush=True,
            )
        return False

    # --- uploading ----------------------------------------------------------------------------
    @property
    def model_uri(self) -> str | None:
        """``models:/m-...`` once the model is on the tracking server (None while it is away)."""
        return self.outbox.model_uri

    def push(self, *, include_end: bool = True) -> bool:
        """Upload what the outbox holds; on failure warn once and keep it (True = all sent)."""
        self._wait_for_background_push()
        try:
            return self.outbox.push(include_end=include_end)
        except Exception as exc:  # any client error: the outbox keeps the data, nothing is lost
            self._warn(exc)
            return False

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            network = type(exc).__module__.startswith(("requests", "urllib3", "mlflow"))
            problem = "cannot reach the tracking server" if network else "cannot write to the tracking store"
            print(
                f"warning: {problem} ({type(exc).__name__}: {str(exc)[:200]}). "
                f"Training goes on; this run's metrics and results are kept in {self.outbox.folder} "
                "and sent when it answers (or later with: python -m cifar sync).",
                flush=True,
            )

    def _push_in_background(self) -> None:
        """Send epoch metrics without holding up training; one push at a time, never a queue."""
        if self._pending is not None and not self._pending.done():
            return  # the running push will pick up this epoch's line too, or the next one will
        if self._pusher is None:
            self._pusher = ThreadPoolExecutor(1, thread_name_prefix="mlflow-outbox")
        self._pending = self._pusher.submit(self.push_metrics)

    def push_metrics(self) -> None:
        try:
            self.outbox.push(include_end=False, metrics_only=True)
        except Exception as exc:
            self._warn(exc)

    def _wait_for_background_push(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    # --- what a training run logs ----------------------------------------------------------
    def log_data(self, data, source: str) -> None:
        """Params for the split sizes and dataset lineage (the cache digest) for each split."""
        mlflow = _mlflow()
        sizes = data.sizes()
        mlflow.log_params({f"data.{split}_size": n for split, n in sizes.items()})
        mlflow.set_tags({"data_source": source, "data_digest": data.digest, "dataset": data.dataset})
        contexts = {"train": "training", "val": "validation", "test": "testing"}
        for split, context in contexts.items():
            self.datasets[split] = (f"{data.dataset}-{split}", f"{data.digest[:10]}-{split}{sizes[split]}")
            dataset = mlflow.data.from_numpy(
                np.asarray(data.images[split]),
                targets=np.asarray(data.labels[split]),
                name=self.datasets[split][0],
                digest=self.datasets[split][1],
            )
            _log_input_racing(dataset, context, {"images": str(sizes[split]), "source": source})

    def log_epoch(self, metrics) -> None:
        # On the training clock: a line appended to a local file; the network is a background thread's.
        self.outbox.add_metrics(mlflow_metrics(metrics.as_dict()), step=metrics.epoch)
        self.tensorboard.epoch(metrics)
        self._push_in_background()

    def publish(self, results) -> None:
        """Publish a results folder (``cifar.run.results``): its metrics, artifact folders and model.

        The folder's files move into the outbox, then go up; ``model_uri`` is set once the model is
        on the server (it stays None while the server is away). The final metrics are linked to the
        logged model, ``val/`` and ``test/`` ones with the split they were measured on.
        """
        box = self.outbox
        for folder in results.artifact_dirs:
            shutil.copytree(folder, box.artifact_dir(folder.name), dirs_exist_ok=True)
        self.tensorboard.results(self.cfg, results.augmented_png, results.confusion_png, results.metrics)
        datasets = {split: self.datasets[split] for split in ("val", "test") if split in self.datasets}
        box.add_metrics(mlflow_metrics(results.metrics), of_model=True, datasets=datasets)
        self.end_tags.update(results.tags)
        box.stage_model(results.model_dir)
        self.push(include_end=False)


def system_metrics_enabled() -> bool:
    """MLflow's system metrics (CPU, memory, disk, network; GPUs with nvidia-ml-py), sampled on its own thread.

    On unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says otherwise (MLflow's own switch; the
    sampling period is ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, 10 s by default).
    """
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() in ("true", "1")


def download_checkpoint(run_id: str, folder: Path, filename: str) -> Path:
    """A run's ``checkpoint/<filename>`` artifact, downloaded into ``folder``."""
    mlflow = _mlflow()
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"checkpoint/{filename}", dst_path=str(folder)
        )
    except (mlflow.exceptions.MlflowException, OSError):
        raise CifarError(
            f"run {run_id} has no checkpoint, here or in the tracking store: only runs stopped by SIGTERM or "
            "Ctrl-C (or still running with train.checkpoint_every > 0 on this machine) can be resumed."
        ) from None
    return Path(local)


def _log_input_racing(dataset, context: str, tags: dict[str, str], attempts: int = 4) -> None:
    """``mlflow.log_input``, retried when another worker registers the same dataset at that moment.

    The server checks for the dataset, then inserts it; two workers doing so at once make one
    insert fail on the unique key (seen on PostgreSQL). The retry finds the row and links it.
    """
    mlflow = _mlflow()
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context, tags=tags)
            return
        except mlflow.exceptions.MlflowException as exc:
            duplicate = any(s in str(exc) for s in ("UniqueViolation", "UNIQUE constraint", "Duplicate entry"))
            if not duplicate or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


class TensorBoardLog:
    """TensorBoard event files for a run, in ``runs/<experiment>/<run>`` and as run artifacts.

    ``tensorboard --logdir runs`` shows every local run; the same files are under the run's
    ``tensorboard/`` artifacts for anyone browsing the tracking server.
    """

    def __init__(self, experiment: str, run_name: str, run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: the slim app venv has no torch

        self.logdir = settings().tensorboard_dir / experiment / f"{run_name}-{run_id[:8]}"
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
            if value is not None:  # validation skipped this epoch (train.eval_every)
                self.writer.add_scalar(name, value, m.epoch)

    def results(self, cfg: ExperimentConfig, augmented_png: Path, confusion_png: Path, final: dict[str, float]) -> None:
        """The results' figures as TensorBoard images (drawn once, by ``cifar.run.results``) and the hparams table."""
        for tag, path in (("augmented_batch", augmented_png), ("confusion_matrix", confusion_png)):
            if path.is_file():
                with Image.open(path) as image:
                    self.writer.add_image(tag, np.asarray(image.convert("RGB")), 0, dataformats="HWC")
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.flat().items()}
        self.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")

    def close_into(self, folder: Path) -> None:
        """Close the event files and copy them to ``folder`` (the run's ``tensorboard/`` artifacts)."""
        self.writer.close()
        shutil.copytree(self.logdir, folder, dirs_exist_ok=True)

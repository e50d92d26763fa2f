"""Hyperparameter search: an Optuna study whose trials are ordinary tracked training runs.

The space is data (``experiments/search/<name>.yaml``). Each trial trains through
``cifar.run.training.train_experiment`` as a nested MLflow run under one parent run per study,
reports validation accuracy per epoch and is pruned early when it falls behind. The
objective is validation accuracy; the test split plays no part in any choice.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch.distributed as dist
from optuna.storages import RetryHeartbeatStaleTrialCallback

from cifar import tracking
from cifar.config import ExperimentConfig, load_experiment
from cifar.engine import device_kind, resolve_device
from cifar.errors import CifarError, Pruned
from cifar.locks import sqlite_file, sqlite_lock
from cifar.run.distributed import launched_by_torchrun, process_group
from cifar.run.training import TrainOptions, train_experiment
from cifar.search.space import SearchSpace, load_space, suggest
from cifar.tracking import TRIAL_RUN_ATTR as RUN_ATTR
from cifar.tracking import close_run

PARENT_ATTR = "mlflow_parent_run_id"


@dataclass
class TuneOptions:
    experiment: str = "cpu"
    space: str | None = None
    n_trials: int | None = 20  # per worker process (Optuna's parallel semantics)
    timeout: float | None = None
    study_name: str | None = None
    storage: str | None = None
    epochs_per_trial: int | None = None
    subset: int | None = None
    seed: int | None = None  # None: a per-worker seed
    data_dir: Path | None = None
    dataset: str = ""  # a prepared dataset other than CIFAR-10
    device: str = "auto"
    heartbeat_interval: int = 10
    grace_period: int = 30


def recipe_for(options: TuneOptions, overrides: list[str]) -> ExperimentConfig:
    """The searched recipe with a trial's overrides, as it trains on this machine (its ``devices:`` values)."""
    return load_experiment(options.experiment, overrides, device_kind=device_kind(resolve_device(options.device)))


def default_storage() -> str:
    """``optuna.db`` beside the local MLflow store (``mlflow.db``), else in the current folder."""
    database = sqlite_file(mlflow.get_tracking_uri())
    folder = database.parent if database is not None else Path(".")
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def open_storage(url: str, heartbeat_interval: int, grace_period: int):
    """RDB storage with heartbeats: a worker killed mid-trial leaves a FAIL trial that is retried."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with sqlite_lock(url, "init"):  # workers starting at once on a new file race on its tables
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=_fail_stale_trial(RetryHeartbeatStaleTrialCallback(max_retry=2)),
            )
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL or an unreachable database
        raise CifarError(
            f"cannot open Optuna storage '{url}': {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None


def _fail_stale_trial(retry):
    """Also close the dead worker's MLflow child run, so it is not left RUNNING forever."""

    def callback(study, trial) -> None:
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            close_run(run_id, "FAILED", {"trial_state": "FAIL", "error": "worker stopped sending heartbeats"})
        retry(study, trial)

    return callback


def make_sampler(spec: dict[str, Any], seed: int):
    """The space file's sampler, every setting stated there (``cifar.search.space.sampler_settings``)."""
    if spec["name"] == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=spec["startup_trials"],
            multivariate=spec["multivariate"],
            group=spec["group"],
            constant_liar=spec["constant_liar"],
        )
    return optuna.samplers.RandomSampler(seed=seed)


def importance_evaluator(name: str):
    """Optuna's importance evaluator named in the space file (5.0's default is PED-ANOVA; fANOVA before)."""
    return {
        "ped_anova": optuna.importance.PedAnovaImportanceEvaluator,
        "fanova": optuna.importance.FanovaImportanceEvaluator,
        "mean_decrease_impurity": optuna.importance.MeanDecreaseImpurityImportanceEvaluator,
    }[name]()


def make_pruner(spec: dict[str, Any]):
    name = spec.get("name", "median")
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(spec.get("startup_trials", 3)), n_warmup_steps=int(spec.get("warmup_epochs", 1))
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise CifarError(f"unknown pruner '{name}': use median, hyperband or none.")


def open_study(options: TuneOptions, space: SearchSpace, storage):
    name = options.study_name or f"{options.experiment}-search"
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True, pruner=make_pruner(space.pruner)
    )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise CifarError(f"study '{name}' already exists and minimizes; pick another --study-name.")
    # An explicit seed is honoured (offset by the trials already there, so a resumed search does
    # not redraw its first points); without one, each worker salts with its process id, so
    # parallel workers never draw the same points.
    base = options.seed if options.seed is not None else os.getpid()
    study.sampler = make_sampler(space.sampler, base + len(study.get_trials(deepcopy=False)))
    return study, base


class Progress:
    """Prints one line per finished trial: counts by state, best so far, and an ETA."""

    def __init__(self, n_trials: int | None, timeout: float | None) -> None:
        self.n_trials, self.timeout = n_trials, timeout
        self.started = time.monotonic()
        self.finished = 0

    def __call__(self, study, trial) -> None:
        self.finished += 1
        states = [t.state for t in study.get_trials(deepcopy=False)]
        count = {
            s: states.count(s)
            for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        }
        elapsed = time.monotonic() - self.started
        eta = []
        if self.n_trials:
            eta.append(elapsed / self.finished * (self.n_trials - self.finished))
        if self.timeout:
            eta.append(max(0.0, self.timeout - elapsed))
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        counts = " ".join(f"{state.name.lower()} {n}" for state, n in count.items())
        eta_text = _duration(min(eta)) if eta else "?"
        line = f"trial {trial.number:>3} {trial.state.name:<8} {value:>7} | {counts} | {best} | ETA {eta_text}"
        print(line, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def objective_for(
    options: TuneOptions,
    space: SearchSpace,
    base_overrides: list[str],
    parent_run_id: str,
    study_name: str,
    distributed: bool = False,
):
    """The objective: one tracked training run per trial, pruned on validation accuracy."""

    def objective(trial: optuna.Trial) -> float:
        chosen = suggest(trial, space)
        overrides = [*(f"{k}={v}" for k, v in chosen.items()), *base_overrides]
        cfg = recipe_for(options, overrides)

        if distributed:  # the other torchrun ranks train this trial with us
            _broadcast(overrides)

        def report(metrics) -> None:
            if metrics.val_accuracy is None:  # not validated this epoch (train.eval_every): nothing to judge
                return
            trial.report(metrics.val_accuracy, metrics.epoch)
            prune = trial.should_prune()
            if distributed:
                _broadcast(prune)  # every rank stops at the same epoch, or none does
            if prune:
                raise Pruned(f"val accuracy {metrics.val_accuracy:.4f} at epoch {metrics.epoch}")

        try:
            outcome = train_experiment(
                cfg,
                TrainOptions(
                    data_dir=options.data_dir,
                    dataset=options.dataset or None,
                    device=options.device,
                    run_name=f"{study_name}-trial-{trial.number}",
                    mlflow_experiment=study_name,
                    experiment_file=options.experiment,
                    progress=False,
                    parent_run_id=parent_run_id,
                    on_epoch_end=report,
                    on_run_start=lambda run_id: trial.set_user_attr(RUN_ATTR, run_id),
                    extra_tags={"optuna_study": study_name, "optuna_trial": str(trial.number)},
                ),
            )
        except Pruned as pruned:  # Optuna's word for it, from here on
            raise optuna.TrialPruned(str(pruned)) from None
        return outcome.fit.best_val_accuracy

    return objective


def _broadcast(value: Any = None) -> Any:
    """Rank 0's ``value`` on every rank of the torchrun group."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _StopTrial(Exception):
    """A follower rank leaves a trial that rank 0 pruned."""


def _follow_trials(options: TuneOptions) -> None:
    """Ranks > 0 under torchrun: train each trial rank 0 announces, until it announces the end."""
    while (overrides := _broadcast()) is not None:

        def follow(metrics) -> None:
            if _broadcast():
                raise _StopTrial

        cfg = recipe_for(options, overrides)
        try:
            train_experiment(
                cfg,
                TrainOptions(data_dir=options.data_dir, dataset=options.dataset or None, device=options.device,
                             track=False, progress=False, on_epoch_end=follow),
            )  # fmt: skip
        except (_StopTrial, CifarError):
            pass  # pruned, or diverged (rank 0 saw the same loss and fails the trial)


def run_search(options: TuneOptions) -> Any:
    """Open (or resume) the study, run this worker's trials, and summarise into the parent run.

    Under torchrun this worker's trials each train on all the ranks (DistributedDataParallel):
    rank 0 runs Optuna and MLflow and tells the others which trial to train; they return None.
    """
    if not launched_by_torchrun():
        return _run_search(options)
    with process_group(resolve_device(options.device)) as group:
        if not group.is_main:
            _follow_trials(options)
            return None
        try:
            return _run_search(options, distributed=True)
        finally:
            _broadcast(None)  # the end of this worker's trials


def _run_search(options: TuneOptions, distributed: bool = False) -> Any:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    base = recipe_for(options, [])
    space = load_space(options.space or options.experiment, base)
    storage_url = options.storage or default_storage()
    storage = open_storage(storage_url, options.heartbeat_interval, options.grace_period)
    study, sampler_seed = open_study(options, space, storage)
    base_overrides = []
    if options.epochs_per_trial:
        base_overrides.append(f"train.epochs={options.epochs_per_trial}")
    if options.subset:
        base_overrides.append(f"data.subset={options.subset}")
    # A fixed budget from the command line wins over the space's own range for that field.
    fixed = {o.split("=")[0] for o in base_overrides}
    space = replace(space, params=tuple(p for p in space.params if p.name not in fixed))

    tracking.check_tracking_store()
    parent_params = {
        **space.as_params(),
        "study_name": study.study_name,
        "sampler": type(study.sampler).__name__,
        **{f"sampler.{k}": v for k, v in space.sampler.items() if k != "name"},
        "pruner": type(study.pruner).__name__,
        "importance_evaluator": space.importance,
        "experiment": options.experiment,
        "space_file": space.source,
        "epochs_per_trial": options.epochs_per_trial or base.train.epochs,
        "subset": options.subset or 0,
    }
    parent_run_id = tracking.study_parent_run(
        study,
        PARENT_ATTR,
        study.study_name,
        parent_params,
        {"optuna_study": study.study_name, "optuna_storage": tracking.redact_url(storage_url)},
    )
    print(
        f"Study '{study.study_name}' in {tracking.redact_url(storage_url)}: {len(study.trials)} trials so far; "
        f"MLflow parent run {parent_run_id}",
        flush=True,
    )
    try:
        study.optimize(
            objective_for(options, space, base_overrides, parent_run_id, study.study_name, distributed),
            n_trials=options.n_trials,
            timeout=options.timeout,
            catch=(CifarError,),
            callbacks=[Progress(options.n_trials, options.timeout)],
        )
    finally:
        tracking.summarize_study(study, parent_run_id, importance_evaluator(space.importance), space.importance)
    return study

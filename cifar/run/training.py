"""One tracked training run: cache -> model -> engine.fit -> test once -> MLflow.

``train.py``, ``mlflow run .`` and (later) each Optuna trial all come through ``train_experiment``.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from cifar.config import ExperimentConfig, config_from_dict
from cifar.data import ensure_cache
from cifar.engine import EpochMetrics, EvalResult, FitResult, Hooks, evaluate, fit, resolve_device, seed_everything
from cifar.engine.budget import plan_budget
from cifar.engine.models import create_model
from cifar.engine.trainstate import TrainingInterrupted, TrainingState
from cifar.errors import CifarError, Pruned, writable_dir
from cifar.run import calibration  # called as calibration.serve_model: a wrapper set on the module is seen
from cifar.run.calibration import describe as describe_calibration
from cifar.run.checkpoint import CHECKPOINT_FILE, checkpoint_root, load_checkpoint, save_checkpoint
from cifar.run.distributed import process_group
from cifar.run.export import model_metadata, save_weights
from cifar.run.results import write_results
from cifar.tracking import TrainingRun, check_tracking_store, download_checkpoint
from cifar.tracking.outbox import outbox_root


@dataclass
class TrainOptions:
    data_dir: Path | None = None
    dataset: str | None = None  # None: CIFAR-10; another's cache is data_dir/NAME (cifar.data.cache.dataset_dir)
    source: str | None = None  # used only when the cache is missing
    device: str = "auto"
    run_name: str | None = None
    mlflow_experiment: str | None = None
    experiment_file: str = ""
    track: bool = True
    save_dir: Path | None = None  # also write safetensors weights + metrics.json here
    progress: bool = True  # print epoch lines and results (off for benchmarks and non-zero ranks)
    progress_bar: bool = True  # and a per-step bar (train.py --no-progress turns it off)
    nested: bool = False
    parent_run_id: str | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    on_epoch_end: Callable[[EpochMetrics], None] | None = None
    on_run_start: Callable[[str], None] | None = None  # gets the MLflow run id (tune records it)
    resume: TrainingState | None = None  # continue from this state, in the MLflow run resume_run_id
    resume_run_id: str | None = None


@dataclass
class TrainOutcome:
    fit: FitResult
    test: EvalResult | None  # None on torchrun ranks other than 0
    run_id: str | None
    model_uri: str | None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGTERM or Ctrl-C asks training to stop after the current step (and save a checkpoint).

    A second signal stops at once. Yields the predicate ``fit`` polls. Only the main thread can
    own signal handlers; elsewhere (an app, a test runner thread) nothing is installed.
    """
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint", flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def resume_training(run_id: str, options: TrainOptions | None = None) -> TrainOutcome:
    """Continue an interrupted run from its checkpoint, in the same MLflow run."""
    options = options or TrainOptions()
    path = checkpoint_root() / run_id / CHECKPOINT_FILE
    if not path.exists():
        path = download_checkpoint(run_id, path.parent, CHECKPOINT_FILE)
    tensors, info = load_checkpoint(path)
    if info.get("run_id") != run_id:
        raise CifarError(f"{path} belongs to run {info.get('run_id')}, not {run_id}; it was not used.")
    cfg = config_from_dict(info["config"], f"the checkpoint of run {run_id}")
    if options.progress:
        print(f"Resuming run {run_id} ({cfg.name}) at epoch {info['epoch']}, step {info['step']}", flush=True)
    state = TrainingState(tensors, info)
    return train_experiment(cfg, replace(options, resume=state, resume_run_id=run_id, track=True))


def default_run_name(cfg: ExperimentConfig) -> str:
    """``cpu-fastnet-900s-s0`` for a time budget (its deadline may move the epochs), else ``…-e6-s0``."""
    length = f"{cfg.train.time_budget:g}s" if cfg.train.time_budget else f"e{cfg.train.epochs}"
    return f"{cfg.name}-{cfg.model.name}-{length}-s{cfg.train.seed}"


def train_experiment(cfg: ExperimentConfig, options: TrainOptions | None = None) -> TrainOutcome:
    """Train ``cfg`` and test it once: prepare -> fit -> finalize -> publish.

    Under torchrun each process is one rank of DistributedDataParallel; only rank 0 tracks,
    prints, tests, calibrates and writes files.
    """
    options = options or TrainOptions()
    with process_group(resolve_device(options.device)) as group, _ranks_stop_together(group):
        options = options if group.is_main else replace(options, track=False, progress=False, save_dir=None)
        _check_outputs(cfg, options)  # before any data work: a wrong URI or folder fails in a second, not after
        data, model = _prepare(cfg, options, group)
        cfg, plan = _plan_budget(model, data, cfg, group.device, options)
        with (
            _tracked(cfg, options, data, group, plan) as run,
            _checkpointed(cfg, run) as on_checkpoint,
            stop_on_signals() as should_stop,
        ):
            hooks = Hooks(_epoch_hooks(run, options), on_checkpoint, should_stop, options.progress,
                          options.progress_bar)  # fmt: skip
            deadline = plan.deadline if plan else None
            result = fit(model, data, cfg, group.device, hooks=hooks, resume=options.resume, deadline=deadline)
            if not group.is_main:  # the test pass and calibration are rank 0's, once
                return TrainOutcome(result, None, None, None)
            test, served = _finalize(model, data, cfg, result, group.device, options, run)
            if run is not None:
                _publish(run, cfg, result, test, data, model, served)
    return TrainOutcome(result, test, run and run.run_id, run and run.model_uri)


@contextlib.contextmanager
def _ranks_stop_together(group) -> Iterator[None]:
    """A stopped DDP run: the other ranks wait for rank 0's checkpoint (torchrun stops them once one exits)."""
    try:
        yield
    except TrainingInterrupted as stop:
        if group.world_size > 1:
            if not group.is_main:
                print(f"rank {group.rank}: stopped at epoch {stop.state.epoch}, step {stop.state.step}", flush=True)
            dist.barrier()
        raise


def _check_outputs(cfg: ExperimentConfig, options: TrainOptions) -> None:
    """The tracking store and every folder the run will write, checked before the data is touched."""
    if options.track:
        check_tracking_store()
        writable_dir(outbox_root(), "tracking outbox", "$CIFAR_OUTBOX")
        if cfg.train.checkpoint_every > 0:
            writable_dir(checkpoint_root(), "checkpoint folder", "$CIFAR_CHECKPOINTS")
    if options.save_dir:
        writable_dir(options.save_dir, "output folder", "--save-dir")


def _prepare(cfg: ExperimentConfig, options: TrainOptions, group):
    """(the recipe's data split, a seeded fresh model); under DDP one process prepares a missing cache."""
    if group.world_size > 1:
        if group.is_main:
            ensure_cache(options.data_dir, options.source, options.dataset)
        dist.barrier()
    data = ensure_cache(options.data_dir, options.source, options.dataset)
    data = data.subset(cfg.data.subset, seed=cfg.train.seed)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = create_model(
        cfg.model.name, num_classes=len(data.classes), width=cfg.model.width, mean=data.mean, std=data.std
    )
    return data, model


def _plan_budget(model, data, cfg: ExperimentConfig, device, options: TrainOptions):
    """(the run's recipe, the budget's plan or None): a budget's epochs are fixed here, before the run starts."""
    if not cfg.train.time_budget or options.resume is not None:  # a resumed run keeps the epochs it planned
        return cfg, None
    plan = plan_budget(model, data, cfg, device)
    if options.progress:
        print(f"Time budget: {plan.reason}.", flush=True)
    return plan.recipe(cfg), plan


@contextlib.contextmanager
def _tracked(cfg: ExperimentConfig, options: TrainOptions, data, group, plan) -> Iterator[TrainingRun | None]:
    """The MLflow run (None untracked), its inputs logged once when it starts."""
    if not options.track:
        yield None
        return
    tags = {**_run_tags(options, group.device, group.world_size), **(plan.as_tags() if plan else {})}
    with TrainingRun(
        cfg, experiment_name=options.mlflow_experiment, run_name=options.run_name or default_run_name(cfg), tags=tags,
        nested=options.nested, parent_run_id=options.parent_run_id, resume_run_id=options.resume_run_id,
    ) as run:  # fmt: skip
        if options.on_run_start:
            options.on_run_start(run.run_id)
        if options.resume is None:
            run.log_data(data, data.manifest["source"])
        yield run


def _run_tags(options: TrainOptions, device, world_size: int) -> dict[str, str]:
    return {
        "experiment_file": options.experiment_file,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "world_size": str(world_size),
        **options.extra_tags,
    }


def _epoch_hooks(run: TrainingRun | None, options: TrainOptions):
    """Each epoch's metrics to the run, then to the caller's hook (a search's pruner)."""
    callbacks = [cb for cb in (run.log_epoch if run is not None else None, options.on_epoch_end) if cb]
    return (lambda metrics: [callback(metrics) for callback in callbacks]) if callbacks else None


@contextlib.contextmanager
def _checkpointed(cfg: ExperimentConfig, run: TrainingRun | None) -> Iterator[Callable[[TrainingState], None] | None]:
    """Yields the hook that saves a tracked run's checkpoint. Stopped: the state is saved and logged
    to the run. Pruned: removed, never to be resumed. Finished: removed, its job done. Any other
    failure keeps the last good one."""
    if run is None:
        yield None
        return
    checkpoint = checkpoint_root() / run.run_id / CHECKPOINT_FILE

    def save(state: TrainingState) -> None:
        save_checkpoint(checkpoint, state.tensors, {**state.info, "config": cfg.to_dict(), "run_id": run.run_id})

    try:
        yield save
    except Pruned:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
        raise
    except TrainingInterrupted as stop:
        save(stop.state)
        run.log_checkpoint(checkpoint)
        print(
            f"Stopped at epoch {stop.state.epoch}, step {stop.state.step}; checkpoint {checkpoint} "
            f"(also logged to the run). Resume with: python train.py --resume {run.run_id}",
            flush=True,
        )
        raise
    shutil.rmtree(checkpoint.parent, ignore_errors=True)


def _finalize(model, data, cfg: ExperimentConfig, result: FitResult, device, options: TrainOptions, run):
    """(the test pass, the served model or None): tested once in the precision served, then
    saved (``--save-dir``) and, for a tracked run, exported with its fitted constants."""
    test = _served_evaluate(model, data.images["test"], data.labels["test"], device, cfg.train)
    if options.progress:
        print(
            f"best val accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch}); "
            f"test accuracy {test.accuracy:.4f}; training {result.train_seconds:.1f} s",
            flush=True,
        )
    metadata = _metadata(cfg, data)
    if options.save_dir:
        _save_weights_and_results(model, Path(options.save_dir), metadata, cfg, result, test)
    if run is None:
        return test, None
    served = _served_model(model, data, test, device, cfg.train, metadata, run.run_id, result.best_val_accuracy)
    if options.progress:
        print(describe_calibration(served.calibration.profile), flush=True)
    return test, served


def _publish(run: TrainingRun, cfg: ExperimentConfig, result: FitResult, test, data, model, served) -> None:
    with tempfile.TemporaryDirectory(prefix="cifar-results-") as tmp:  # made here, published by tracking
        run.publish(write_results(Path(tmp), cfg=cfg, fit=result, test=test, data=data, model=model, served=served))


def _metadata(cfg: ExperimentConfig, data) -> dict:
    return model_metadata(
        cfg.model.name, cfg.model.width, data.classes, data.mean, std=data.std,
        experiment=cfg.name, data_digest=data.digest, tta=cfg.train.tta,
        tta_translate=cfg.train.tta_translate if cfg.train.tta else 0,  # without flip TTA, none
    )  # fmt: skip


def _save_weights_and_results(model, folder: Path, metadata: dict, cfg: ExperimentConfig, result, test) -> None:
    """``--save-dir``: safetensors weights with the recipe and results beside them."""
    results = {
        "best_val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "train_seconds": result.train_seconds,
        "history": [vars(m) for m in result.history],
    }
    save_weights(model, folder, {**metadata, "recipe": cfg.to_dict(), "results": results})


def _served_evaluate(model, images, labels, device, t) -> EvalResult:
    """fp32, the precision the exported model serves in, with the features its OOD score reads."""
    return evaluate(
        model,
        images,
        labels,
        device=device,
        batch_size=t.eval_batch_size,
        tta=t.tta,
        tta_translate=t.tta_translate,
        amp=False,
        channels_last=t.channels_last,
        with_features=True,
    )


def _served_model(model, data, test: EvalResult, device, t, metadata, run_id: str, val_accuracy: float):
    """The served graph, its constants fitted on training and validation images, checked against PyTorch."""
    metadata = {**metadata, "run_id": run_id, "val_accuracy": val_accuracy, "test_accuracy": test.accuracy}
    served = calibration.serve_model(
        model,
        data,
        metadata,
        device,
        batch_size=t.eval_batch_size,
        channels_last=t.channels_last,
        test=(test.logits, test.features),
    )
    if served.parity > 1e-3:
        raise CifarError(f"the exported ONNX model disagrees with PyTorch (max |diff| {served.parity:.2e}).")
    return served

"""One tracked training run: cache -> model -> engine.fit -> test once -> MLflow.

``train.py``, ``mlflow run .`` and (later) each Optuna trial all come through ``train_experiment``.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cifar.config import ExperimentConfig
from cifar.data import ensure_cache
from cifar.engine import EpochMetrics, EvalResult, FitResult, evaluate, fit, resolve_device, seed_everything
from cifar.models import create_model


@dataclass
class TrainOptions:
    data_dir: Path | None = None
    source: str | None = None  # used only when the cache is missing
    device: str = "auto"
    run_name: str | None = None
    mlflow_experiment: str | None = None
    experiment_file: str = ""
    track: bool = True
    save_dir: Path | None = None  # also write safetensors weights + metrics.json here
    progress: bool = True
    nested: bool = False
    parent_run_id: str | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    on_epoch_end: Callable[[EpochMetrics], None] | None = None
    on_run_start: Callable[[str], None] | None = None  # gets the MLflow run id (tune records it)


@dataclass
class TrainOutcome:
    fit: FitResult
    test: EvalResult
    run_id: str | None
    model_uri: str | None


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-{cfg.model.name}-e{cfg.train.epochs}-s{cfg.train.seed}"


def train_experiment(cfg: ExperimentConfig, options: TrainOptions | None = None) -> TrainOutcome:
    import torch

    from cifar.tracking import TrainingRun, check_tracking_store

    options = options or TrainOptions()
    device = resolve_device(options.device)
    if options.track:
        check_tracking_store()  # before any data work: a wrong URI fails in a second, not after
    data = ensure_cache(options.data_dir, options.source)
    source = data.manifest["source"]
    data = data.subset(cfg.data.subset, seed=cfg.train.seed)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = create_model(
        cfg.model.name, num_classes=len(data.classes), width=cfg.model.width, mean=data.mean, std=data.std
    )

    tags = {
        "experiment_file": options.experiment_file,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        **options.extra_tags,
    }
    run = (
        TrainingRun(
            cfg,
            experiment_name=options.mlflow_experiment,
            run_name=options.run_name or default_run_name(cfg),
            tags=tags,
            nested=options.nested,
            parent_run_id=options.parent_run_id,
        )
        if options.track
        else contextlib.nullcontext()
    )
    with run:
        callbacks = [cb for cb in (run.log_epoch if options.track else None, options.on_epoch_end) if cb]
        if options.track:
            if options.on_run_start:
                options.on_run_start(run.run_id)
            run.log_data(data, source)

        def on_epoch_end(metrics: EpochMetrics) -> None:
            for callback in callbacks:
                callback(metrics)

        result = fit(
            model,
            data.images["train"],
            data.labels["train"],
            data.images["val"],
            data.labels["val"],
            cfg,
            device,
            on_epoch_end=on_epoch_end,
            progress=options.progress,
        )
        t = cfg.train
        test = evaluate(
            model,
            data.images["test"],
            data.labels["test"],
            device=device,
            batch_size=t.eval_batch_size,
            tta=t.tta,
            amp=t.amp,
            channels_last=t.channels_last,
        )
        if options.progress:
            print(
                f"best val accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch}); "
                f"test accuracy {test.accuracy:.4f}; training {result.train_seconds:.1f} s",
                flush=True,
            )
        from cifar.export import model_metadata, save_weights

        metadata = model_metadata(
            cfg.model.name,
            cfg.model.width,
            data.classes,
            data.mean,
            std=data.std,
            experiment=cfg.name,
            data_digest=data.digest,
            tta=cfg.train.tta,
        )
        if options.save_dir:
            save_weights(
                model,
                Path(options.save_dir),
                {
                    **metadata,
                    "recipe": cfg.to_dict(),
                    "results": {
                        "best_val_accuracy": result.best_val_accuracy,
                        "best_epoch": result.best_epoch,
                        "test_accuracy": test.accuracy,
                        "test_loss": test.loss,
                        "train_seconds": result.train_seconds,
                        "history": [vars(m) for m in result.history],
                    },
                },
            )
        if not options.track:
            return TrainOutcome(result, test, None, None)
        run.log_results(fit=result, test=test, model=model, data=data, metadata=metadata)
    return TrainOutcome(result, test, run.run_id, run.model_uri)

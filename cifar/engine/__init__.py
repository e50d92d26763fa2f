"""Training and evaluation: ``steps`` (one optimisation step, one evaluation pass) and ``loop`` (``fit``).

Tensors in, metrics out; nothing here touches files or MLflow.
"""

from cifar.engine.loop import (
    EpochSums,
    Hooks,
    Training,
    begin_epoch,
    end_epoch,
    fit,
    prepare_training,
    resume_training,
    train_one_epoch,
)
from cifar.engine.steps import (
    EpochCallback,
    EpochMetrics,
    EvalResult,
    FitResult,
    device_kind,
    distributed_rank_world,
    evaluate,
    native_bf16,
    resolve_device,
    seed_everything,
    train_step,
)

__all__ = [
    "EpochCallback",
    "EpochMetrics",
    "EpochSums",
    "EvalResult",
    "FitResult",
    "Hooks",
    "Training",
    "begin_epoch",
    "device_kind",
    "distributed_rank_world",
    "end_epoch",
    "evaluate",
    "fit",
    "native_bf16",
    "prepare_training",
    "resolve_device",
    "resume_training",
    "seed_everything",
    "train_one_epoch",
    "train_step",
]

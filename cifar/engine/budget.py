"""A training budget (``train.time_budget``): time a few real steps here, then fix the epochs.

The schedule's length must be known before the first step, so the plan is made first: a copy
of the model trains a few real batches (its warm-up steps are not timed) and scores the
validation split once; the epochs that fit in what is left of the budget become the recipe's
``train.epochs``. The estimate is at full resolution with every parameter learning, so
low-resolution epochs and a frozen stem only make the run end earlier. Tensors in, a plan out.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from cifar.config import ExperimentConfig
from cifar.engine.loop import prepare_training
from cifar.engine.steps import evaluate, train_step

WARMUP_STEPS = 3  # first steps pay for allocation, oneDNN/cuDNN kernel choice, compilation: not timed
TIMED_STEPS = 8


@dataclass(frozen=True)
class BudgetPlan:
    budget_seconds: float
    probe_seconds: float  # spent planning, inside the budget
    step_seconds: float
    val_seconds: float
    steps_per_epoch: int
    epochs: int

    @property
    def reason(self) -> str:
        per_epoch = self.step_seconds * self.steps_per_epoch
        return (
            f"{self.budget_seconds:g} s budget: {self.probe_seconds:.1f} s to measure, then {self.epochs} epochs of "
            f"{self.steps_per_epoch} steps at {self.step_seconds * 1000:.1f} ms/step ({per_epoch:.1f} s) "
            f"plus validation passes of {self.val_seconds:.2f} s"
        )

    def as_tags(self) -> dict[str, str]:
        return {
            "budget.seconds": f"{self.budget_seconds:g}",
            "budget.epochs": str(self.epochs),
            "budget.steps": str(self.epochs * self.steps_per_epoch),
            "budget.step_ms": f"{self.step_seconds * 1000:.2f}",
            "budget.reason": self.reason,
        }


def plan_budget(
    model: nn.Module,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    cfg: ExperimentConfig,
    device: torch.device,
) -> tuple[ExperimentConfig, BudgetPlan]:
    """The recipe with ``train.epochs`` set so that training ends within ``train.time_budget`` seconds."""
    t = cfg.train
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the real run's draws stay
        run = prepare_training(copy.deepcopy(model), train_images, train_labels, val_images, val_labels, cfg, device)
        run.wrap()
        times = []
        batches = iter(run.loader)
        for _ in range(WARMUP_STEPS + TIMED_STEPS):
            x, y = next(batches, (None, None))
            if x is None:
                batches = iter(run.loader)
                x, y = next(batches)
            x, y = x[run.rank :: run.world], y[run.rank :: run.world]
            tick = time.perf_counter()
            loss, _ = train_step(run.step_model, run.optimizer, x, y, amp=t.amp, label_smoothing=t.label_smoothing)
            loss.item()  # waits for the GPU: the step's real time
            times.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        evaluate(run.eval_model, run.val_images, run.val_labels, device=device, batch_size=t.eval_batch_size,
                 tta=t.tta, amp=t.amp, channels_last=t.channels_last)  # fmt: skip
        val_seconds = time.perf_counter() - tick
    step_seconds = float(np.median(times[WARMUP_STEPS:]))
    probe = time.perf_counter() - started
    steps = len(run.loader)
    # validation passes per epoch: 1 with eval_every=1; 1/N with N; only the last with 0
    val_share = 1.0 / t.eval_every if t.eval_every else 0.0
    left = t.time_budget - probe - val_seconds * (1 - val_share)  # the last epoch is always validated
    epochs = max(1, math.floor(left / (steps * step_seconds + val_seconds * val_share)))
    if run.world > 1:  # rank 0's plan for all: ranks that disagreed on the epochs would hang
        import torch.distributed as dist

        shared = [epochs]
        dist.broadcast_object_list(shared, src=0)
        epochs = shared[0]
    plan = BudgetPlan(t.time_budget, probe, step_seconds, val_seconds, steps, epochs)
    return replace(cfg, train=replace(t, epochs=epochs)), plan

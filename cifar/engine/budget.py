"""A training budget (``train.time_budget``): time a few real steps here, then fix the epochs.

The schedule's length must be known before the first step, so the plan is made first: a copy
of the model trains a few real batches (its warm-up steps are not timed) and scores the
validation split once; the epochs that fit in what is left of the budget become the run's
``train.epochs`` (``BudgetPlan.recipe``), fixed before the run starts. Low-resolution epochs and
the steps after the stem freezes are timed in their own state, since they cost less. Tensors
in, a plan out.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cifar.config import ExperimentConfig
from cifar.engine.horizon import Deadline
from cifar.engine.loop import begin_epoch, prepare_training
from cifar.engine.steps import evaluate

WARMUP_STEPS = 3  # first steps pay for allocation, oneDNN/cuDNN kernel choice, compilation: not timed
TIMED_STEPS = 8
# Share of the budget the plan fills: a median step leaves out the slow ones (a busy machine,
# per-epoch costs outside the steps such as the loader's shuffle and a checkpoint).
SAFETY = 0.97


@dataclass(frozen=True)
class BudgetPlan:
    budget_seconds: float
    probe_seconds: float  # spent planning, inside the budget
    step_seconds: float
    low_res_step_seconds: float  # 0 without low-resolution epochs
    val_seconds: float
    steps_per_epoch: int
    epochs: int
    started: float = 0.0  # time.perf_counter() when planning began: the budget's clock

    @property
    def deadline(self) -> Deadline:
        """When training must end; ``fit`` moves the last epoch to keep it."""
        return Deadline(self.started + self.budget_seconds, self.val_seconds)

    @property
    def reason(self) -> str:
        per_epoch = self.step_seconds * self.steps_per_epoch
        return (
            f"{self.budget_seconds:g} s budget: {self.probe_seconds:.1f} s to measure, then {self.epochs} epochs of "
            f"{self.steps_per_epoch} steps at {self.step_seconds * 1000:.1f} ms/step ({per_epoch:.1f} s)"
            + (
                f", low-resolution ones at {self.low_res_step_seconds * 1000:.1f} ms/step"
                if self.low_res_step_seconds
                else ""
            )
            + f", plus validation passes of {self.val_seconds:.2f} s, filling {SAFETY:.0%} of the budget"
        )

    def recipe(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The run's recipe: ``cfg`` with the planned epochs (a deadline moves the horizon, not this)."""
        return replace(cfg, train=replace(cfg.train, epochs=self.epochs))

    def as_tags(self) -> dict[str, str]:
        return {
            "budget.seconds": f"{self.budget_seconds:g}",
            "budget.epochs": str(self.epochs),
            "budget.steps": str(self.epochs * self.steps_per_epoch),
            "budget.step_ms": f"{self.step_seconds * 1000:.2f}",
            "budget.reason": self.reason,
        }


def _step_seconds(run, epoch: int, timed: int) -> float:
    """Median seconds of ``timed`` real steps in ``epoch``'s state (resolution, frozen stem), after warm-up.

    A step is timed from drawing its batch: the loader's gather, augmentation and resizing run on the
    same device as the step, so on a CPU they are part of what an epoch costs.
    """
    begin_epoch(run, epoch)
    times = []
    batches = iter(run.loader)
    for _ in range(WARMUP_STEPS + timed):
        tick = time.perf_counter()
        x, y = next(batches, (None, None))
        if x is None:
            batches = iter(run.loader)
            x, y = next(batches)
        loss, _, _ = run.train_on(x, y)
        loss.item()  # waits for the GPU: the step's real time
        times.append(time.perf_counter() - tick)
    return float(np.median(times[WARMUP_STEPS:]))


def fitting_epochs(seconds: float, steps: int, low_res_step: float, step: float, low_res_epochs: int,
                   val_per_epoch: float) -> int:  # fmt: skip
    """The most epochs whose steps (the first ``low_res_epochs`` at the cheaper rate) fit in ``seconds``."""
    epochs, spent = 0, 0.0
    while True:
        cost = steps * (low_res_step if epochs < low_res_epochs else step) + val_per_epoch
        if spent + cost > seconds:
            return max(1, epochs)
        epochs, spent = epochs + 1, spent + cost


def plan_budget(model: nn.Module, data, cfg: ExperimentConfig, device: torch.device) -> BudgetPlan:
    """The epochs that end training within ``train.time_budget`` seconds, timed on ``data``'s splits here."""
    t = cfg.train
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the real run's draws stay
        run = prepare_training(copy.deepcopy(model), data, cfg, device)
        run.wrap()
        # Low-resolution epochs cost less per step; after them (and the stem's freezing) steps cost
        # what they will for the rest of the run: each state is timed as it will run.
        low_res_step = _step_seconds(run, 1, TIMED_STEPS) if t.low_res_epochs else 0.0
        step_seconds = _step_seconds(run, max(t.low_res_epochs, t.whiten_bias_epochs) + 1, TIMED_STEPS)
        tick = time.perf_counter()
        evaluate(run.eval_model, run.val_images, run.val_labels, device=device, batch_size=t.eval_batch_size,
                 tta=t.tta, tta_translate=t.tta_translate, amp=t.amp, channels_last=t.channels_last)  # fmt: skip
        val_seconds = time.perf_counter() - tick
    probe = time.perf_counter() - started
    steps = len(run.loader)
    # validation passes per epoch: 1 with eval_every=1; 1/N with N; only the last with 0
    val_share = 1.0 / t.eval_every if t.eval_every else 0.0
    left = SAFETY * (t.time_budget - probe) - val_seconds * (1 - val_share)  # the last epoch is always validated
    epochs = fitting_epochs(left, steps, low_res_step, step_seconds, t.low_res_epochs, val_seconds * val_share)
    if run.world > 1:  # rank 0's plan for all: ranks that disagreed on the epochs would hang
        shared = [epochs]
        dist.broadcast_object_list(shared, src=0)
        epochs = shared[0]
    return BudgetPlan(t.time_budget, probe, step_seconds, low_res_step, val_seconds, steps, epochs, started)

"""The schedule's horizon, and moving it while training runs against a deadline.

A budget's plan (``cifar.engine.budget``) times a few steps; real epochs can run slower (a busy
machine, per-epoch costs the probe does not see) or faster. After each epoch the run compares
what the epochs it has planned will cost, at the rate its own epochs ran, with the time left,
and moves its last epoch. The schedule keeps the progress it has reached and spreads the rest
over the new number of steps, so the learning rate does not jump. The arithmetic is pure;
``keep_deadline`` applies it to a running ``Training``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch.distributed as dist


class Training(Protocol):
    """What moving the horizon needs of a running training (``cifar.engine.loop.Training``)."""

    cfg: Any
    result: Any
    loader: Any
    world: int

    @property
    def epochs(self) -> int: ...

    def set_epochs(self, epochs: int) -> None: ...


# Lengthening needs the extra epoch to fit in this share of the time left: a run that just
# shortened does not lengthen again on the next epoch's noise.
LENGTHEN_MARGIN = 0.97
FULL_SIZE = 32  # CIFAR-10's side: what train.low_res epochs are scaled to


@dataclass
class Horizon:
    """Schedule progress (0 at the first step, 1 at ``total_steps``), movable mid-run."""

    total_steps: int
    from_step: int = 0  # where the horizon last moved, and the progress reached there
    from_progress: float = 0.0

    def progress(self, step: int) -> float:
        span = max(1, self.total_steps - self.from_step)
        return min(1.0, self.from_progress + (step - self.from_step) * (1.0 - self.from_progress) / span)

    def move(self, step: int, total_steps: int) -> None:
        """End at ``total_steps`` instead; steps from ``step`` on cover the progress left."""
        self.from_progress, self.from_step, self.total_steps = self.progress(step), step, total_steps

    def as_dict(self) -> dict:
        return asdict(self)

    def load(self, saved: dict) -> None:
        """In place: the schedule's lambda holds this object."""
        self.total_steps, self.from_step = saved["total_steps"], saved["from_step"]
        self.from_progress = saved["from_progress"]


@dataclass(frozen=True)
class Deadline:
    """When training must end (a ``time.perf_counter()`` value) and what the last validation costs."""

    at: float
    val_seconds: float


def epochs_before_deadline(seconds_left: float, done: int, planned: int, epoch_seconds: float,
                           val_seconds: float) -> int:  # fmt: skip
    """The last epoch to plan for after ``done`` epochs: ``planned`` while it still fits.

    ``epoch_seconds`` is what an epoch has cost here so far; the last epoch is followed by a
    validation pass of ``val_seconds``. Shortens when the planned epochs would overrun the time
    left; lengthens only when at least one more whole epoch fits with a margin; never below one
    more epoch (the run ends on a trained, validated epoch).
    """
    if epoch_seconds <= 0:
        return planned
    fits = math.floor((seconds_left - val_seconds) / epoch_seconds)
    if (planned - done) * epoch_seconds + val_seconds > seconds_left:
        return done + max(1, fits)
    roomy = math.floor((LENGTHEN_MARGIN * seconds_left - val_seconds) / epoch_seconds)
    return max(planned, done + roomy)


def keep_deadline(run: Training, epoch: int, deadline: Deadline) -> bool:
    """After ``epoch``: move the last epoch so that training ends by the deadline, at the rate the
    run's own recent epochs ran (timed once the resolution and the stem have settled). True when it moved."""
    t = run.cfg.train
    settled = [m.epoch_seconds for m in run.result.history if m.epoch > max(t.low_res_epochs, t.whiten_bias_epochs)]
    if epoch >= run.epochs or not settled:
        return False
    left = deadline.at - time.perf_counter()
    per_epoch = float(np.mean(settled[-3:]))  # recent epochs: a machine that slows down is followed
    epochs = epochs_before_deadline(left, epoch, run.epochs, per_epoch, deadline.val_seconds)
    return _move(run, epochs, f"after epoch {epoch}: {run.epochs} -> {epochs} epochs ({left:.0f} s left, "
                              f"epochs taking {per_epoch:.1f} s)")  # fmt: skip


def stretch_last_epoch(run: Training, epoch: int, steps_done: int, epoch_start: float, deadline: Deadline) -> bool:
    """Halfway through the planned last epoch: lengthen the plan when whole epochs still fit after it.

    The check after each epoch cannot grow a plan of one epoch (training ends there) or of two
    whose first runs at low resolution (not a settled rate). A probe timed while another process
    loaded the machine planned one epoch and trained 161 s of a 900 s budget. The epochs added
    run at full size: a low-resolution rate is scaled up by the pixels.
    """
    t, steps = run.cfg.train, len(run.loader)
    step_seconds = (time.perf_counter() - epoch_start) / steps_done
    per_epoch = step_seconds * steps * ((FULL_SIZE / t.low_res) ** 2 if epoch <= t.low_res_epochs else 1.0)
    left = deadline.at - time.perf_counter() - step_seconds * (steps - steps_done)  # once this epoch ends
    more = max(0, math.floor((LENGTHEN_MARGIN * left - deadline.val_seconds) / per_epoch))
    return _move(run, epoch + more, f"halfway through epoch {epoch}: {run.epochs} -> {epoch + more} epochs "
                                    f"({left:.0f} s left after it, epochs taking about {per_epoch:.1f} s)")  # fmt: skip


def _move(run: Training, epochs: int, note: str) -> bool:
    """End after ``epochs``. Under DDP rank 0 decides for all: ranks with different last epochs would
    hang in a collective."""
    if run.world > 1:
        shared = [epochs, note]
        dist.broadcast_object_list(shared, src=0)
        epochs, note = shared
    if epochs == run.epochs:
        return False
    run.result.replans.append(note)
    run.set_epochs(epochs)
    return True

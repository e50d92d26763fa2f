"""A time budget's deadline moves the last epoch mid-run: the schedule bends, never jumps, and resumes as moved."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import STEP

from cifar.config import load_experiment
from cifar.data import load_cache
from cifar.engine import Hooks, fit, seed_everything
from cifar.engine.horizon import Deadline, Horizon, epochs_before_deadline
from cifar.engine.models import create_model
from cifar.engine.optim import lr_factor

CPU = torch.device("cpu")


def test_a_moved_horizon_keeps_the_progress_reached_and_ends_at_the_new_step():
    horizon = Horizon(100)
    assert [horizon.progress(s) for s in (0, 50, 100, 120)] == [0.0, 0.5, 1.0, 1.0]
    horizon.move(40, 60)  # shortened at 40% progress: the 20 steps left cover the other 60%
    assert horizon.progress(40) == pytest.approx(0.4) and horizon.progress(50) == pytest.approx(0.7)
    assert horizon.progress(60) == pytest.approx(1.0)
    horizon.move(50, 110)  # lengthened at 70%: 60 steps for the last 30%
    assert horizon.progress(50) == pytest.approx(0.7) and horizon.progress(110) == pytest.approx(1.0)
    again = Horizon(1)
    again.load(horizon.as_dict())
    assert again == horizon


@pytest.mark.parametrize(
    ("left", "done", "planned", "expected"),
    [
        (90.0, 2, 10, 10),  # 8 epochs of 10 s + 2 s validation = 82 s: fits; a 9th not within 97% of 90 s
        (60.0, 2, 10, 7),  # overruns: the 5 epochs that fit before the last validation
        (5.0, 2, 10, 3),  # not even one fits: one more epoch all the same, never none
        (150.0, 2, 10, 16),  # 14 more fit in 97% of 150 s: lengthened
        (84.0, 2, 10, 10),  # a 9th would fit in 84 s but not in its 97%: no lengthening on noise
    ],
)
def test_epochs_before_deadline_shortens_on_an_overrun_and_lengthens_only_with_room(left, done, planned, expected):
    assert epochs_before_deadline(left, done, planned, epoch_seconds=10.0, val_seconds=2.0) == expected


def smoke(epochs: int, *extra: str):
    return load_experiment("smoke", [f"train.epochs={epochs}", "train.batch_size=10", "optim.lr=0.02",
                                     "train.eval_every=0", "train.checkpoint_every=1",
                                     "schedule.warmup_fraction=0", *extra])  # fmt: skip


def _fit_against(prepared_dir, clock, epochs: int, seconds: float, **kwargs):
    """The smoke recipe with ``epochs`` planned and ``seconds`` (virtual) until the deadline (0: none)."""
    data = load_cache(prepared_dir)
    cfg = smoke(epochs)
    seed_everything(cfg.train.seed, deterministic=True)
    model = create_model(cfg.model.name, mean=data.mean, std=data.std)
    deadline = Deadline(clock.now + seconds, val_seconds=0.0) if seconds else None
    result = fit(model, data, cfg, CPU, deadline=deadline, **kwargs)
    return cfg, model, result, deadline


EPOCH = 40 * STEP  # 400 images in batches of 10


def test_a_deadline_too_close_for_the_plan_shortens_the_run_and_the_rate_still_ends_at_its_floor(prepared_dir, clock):
    states = []
    cfg, model, result, deadline = _fit_against(
        prepared_dir, clock, 8, 3.5 * EPOCH, hooks=Hooks(checkpoint=lambda state: states.append(copy.deepcopy(state)))
    )
    assert [m.epoch for m in result.history] == [1, 2, 3]  # 3 whole epochs fit in 3.5
    assert result.replans == ["after epoch 1: 8 -> 3 epochs (100 s left, epochs taking 40.0 s)"]
    assert result.history[-1].val_accuracy is not None, "the moved last epoch is validated"
    assert clock.now <= deadline.at
    # The schedule bent: decaying at every epoch's end, never a jump back up, and the floor reached at the new end.
    rates = [m.learning_rate for m in result.history]
    assert all(b < a for a, b in zip(rates, rates[1:], strict=False)), rates
    floor = cfg.optim.lr * lr_factor(cfg.schedule.name, cfg.schedule.warmup_fraction, cfg.schedule.final_lr_fraction)(1)
    assert rates[-1] == pytest.approx(floor, abs=1e-9)

    # A run resumed from a checkpoint taken after the move ends where the moved run ended, with its weights.
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    moved = states[-1].info["horizon"]
    state = next(s for s in states if s.info["horizon"] == moved and s.epoch <= 3)
    _, resumed_model, resumed, _ = _fit_against(prepared_dir, clock, 8, 0, resume=state)
    assert resumed.history[-1].epoch == 3 and not resumed.replans
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_deadline_with_room_to_spare_lengthens_the_run(prepared_dir, clock):
    _, _, result, deadline = _fit_against(prepared_dir, clock, 3, 7 * EPOCH)
    assert result.replans[0] == "after epoch 1: 3 -> 6 epochs (240 s left, epochs taking 40.0 s)"
    assert [m.epoch for m in result.history] == [1, 2, 3, 4, 5, 6] and clock.now <= deadline.at


def test_a_probe_slowed_by_a_busy_machine_plans_one_epoch_and_the_run_grows_into_the_budget(
    prepared_dir, clock, monkeypatch
):
    """The probe reads 50x the real step time (another process held the cores): it plans a single
    low-resolution epoch. Halfway through it the run sees the room left and adds full-size epochs."""
    from cifar.engine import budget

    timed = budget._step_seconds
    monkeypatch.setattr(budget, "_step_seconds", lambda *args: 50 * timed(*args))
    data = load_cache(prepared_dir)
    cfg = smoke(6, "train.time_budget=400", "train.low_res_epochs=1", "train.low_res=16")
    seed_everything(cfg.train.seed, deterministic=True)
    model = create_model(cfg.model.name, mean=data.mean, std=data.std)
    plan = budget.plan_budget(model, data, cfg, CPU)
    planned = plan.recipe(cfg)
    assert planned.train.epochs == 1  # 40 steps at a measured 50 s each: only the one epoch the plan never goes below
    result = fit(model, data, planned, CPU, deadline=plan.deadline)
    # Halfway through epoch 1 (20 steps, 20 s): 20 s to finish it, then full-size epochs counted at 4x
    # the low-resolution rate (160 s): 2 more fit in 97% of what is left.
    assert result.replans[0].startswith("halfway through epoch 1: 1 -> 3 epochs"), result.replans
    assert result.history[-1].epoch >= 3 and result.history[-1].val_accuracy is not None
    assert all(m.val_accuracy is None for m in result.history[:-1])
    assert clock.now <= plan.deadline.at  # the deadline still holds

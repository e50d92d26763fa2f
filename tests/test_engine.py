"""The training loop learns real images, picks the best epoch on validation, and is reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import STEP, train_small_model

from cifar.config import load_experiment
from cifar.data import load_cache
from cifar.engine import Hooks, evaluate, fit, seed_everything
from cifar.engine.loop import compiled_graphs, prepare_training, warm_up_compile
from cifar.engine.models import create_model
from cifar.engine.steps import tta_views
from cifar.engine.trainstate import TrainingInterrupted
from cifar.errors import CifarError

CPU = torch.device("cpu")


def test_learns_and_keeps_the_best_validation_epoch(prepared_dir):
    epochs = []
    data, cfg, model, result = train_small_model(prepared_dir, callback=epochs.append)
    assert [m.epoch for m in epochs] == list(range(1, 7)) and result.history == epochs
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.best_val_accuracy == max(m.val_accuracy for m in result.history)
    assert result.history[result.best_epoch - 1].val_accuracy == result.best_val_accuracy
    # The model now holds the weights of the chosen epoch: evaluating val reproduces its score.
    val = evaluate(model, data.images["val"], data.labels["val"], device=CPU, tta=cfg.train.tta)
    assert val.accuracy == pytest.approx(result.best_val_accuracy)
    test = evaluate(model, data.images["test"], data.labels["test"], device=CPU)
    assert test.accuracy > 0.2  # 10 classes: chance is 0.1
    assert all(m.images_per_second > 0 and m.epoch_seconds > 0 for m in result.history)


@pytest.mark.parametrize(("every", "validated"), [(2, [2, 4, 6]), (4, [4, 6]), (0, [6])])
def test_eval_every_validates_only_the_epochs_asked_and_the_last(prepared_dir, every, validated):
    data, cfg, model, result = train_small_model(prepared_dir, [f"train.eval_every={every}"])
    assert [m.epoch for m in result.history if m.val_accuracy is not None] == validated
    assert all(m.val_loss is None for m in result.history if m.epoch not in validated)
    assert all("val_accuracy" not in m.as_dict() for m in result.history if m.epoch not in validated)
    assert result.best_epoch in validated
    assert result.best_val_accuracy == max(m.val_accuracy for m in result.history if m.epoch in validated)
    val = evaluate(model, data.images["val"], data.labels["val"], device=CPU, tta=cfg.train.tta)
    assert val.accuracy == pytest.approx(result.best_val_accuracy)  # the chosen epoch's weights


def test_tta_views_are_the_mirror_and_the_shifts_each_weighted_to_sum_to_one():
    x = torch.rand(3, 3, 32, 32)
    assert [w for w, _ in tta_views(x, False)] == [1.0]
    (_, plain), (_, mirror) = tta_views(x, True)
    assert torch.equal(plain, x) and torch.equal(mirror, x.flip(3))
    for t in (1, 2):
        views = tta_views(x, True, t)
        assert len(views) == 6 and sum(w for w, _ in views) == pytest.approx(1.0)
        assert all(view.shape == x.shape for _, view in views)
        (_, up_left), (_, up_left_mirror), (_, down_right), _ = views[2:]
        assert torch.equal(up_left[..., t:, t:], x[..., :-t, :-t])  # content moved t pixels down-right
        assert torch.equal(down_right[..., :-t, :-t], x[..., t:, t:])
        assert torch.equal(up_left_mirror, up_left.flip(3))
        assert torch.equal(up_left[..., 0, t:], x[..., t, :-t])  # the border row reflects, never zeros


def test_evaluate_scores_the_average_over_the_tta_views(prepared_dir):
    data = load_cache(prepared_dir)
    torch.manual_seed(0)
    model = create_model("fastnet", num_classes=10, width=0.25, mean=data.mean, std=data.std).eval()
    images = data.images["val"][:50]
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    labels = data.labels["val"][:50]
    results = {}
    for tta, t in ((False, 0), (True, 0), (True, 1)):
        got = evaluate(model, images, labels, device=CPU, tta=tta, tta_translate=t, amp=False).logits
        with torch.no_grad():
            expected = sum(w * model(view) for w, view in tta_views(x, tta, t))
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
        results[tta, t] = got
    assert not np.allclose(results[True, 0], results[True, 1], atol=1e-4)  # the shifts change the scores


def test_eval_every_below_zero_is_refused():
    with pytest.raises(CifarError, match="train.eval_every must be 0"):
        load_experiment("smoke", ["train.eval_every=-1"])


def test_same_seed_same_weights(prepared_dir):
    *_, model_a, result_a = train_small_model(prepared_dir, ["train.epochs=2"])
    *_, model_b, result_b = train_small_model(prepared_dir, ["train.epochs=2"])
    assert [m.train_loss for m in result_a.history] == [m.train_loss for m in result_b.history]
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_ema_and_cosine_schedule_run(prepared_dir):
    *_, result = train_small_model(prepared_dir, ["train.epochs=2", "train.ema_decay=0.9", "schedule.name=cosine"])
    assert result.history[-1].learning_rate == pytest.approx(0.0, abs=1e-9)


def test_divergence_is_a_clear_error(prepared_dir):
    with pytest.raises(CifarError, match="diverged at epoch 1.*lower optim.lr"):
        train_small_model(prepared_dir, ["optim.lr=1e12", "train.epochs=1"])


def test_evaluate_tta_uses_the_mirror(prepared_dir):
    data = load_cache(prepared_dir)
    model = create_model("small_cnn", mean=data.mean, std=data.std).eval()
    images = np.asarray(data.images["test"][:20])
    plain = evaluate(model, images, data.labels["test"][:20], device=CPU).logits
    mirrored = evaluate(model, images[:, :, ::-1].copy(), data.labels["test"][:20], device=CPU).logits
    both = evaluate(model, images, data.labels["test"][:20], device=CPU, tta=True).logits
    assert np.allclose(both, (plain + mirrored) / 2, atol=1e-5)


AIRBENCH_TRICKS = ["train.lookahead=true", "augment.alternate_flip=true", "train.whiten_bias_epochs=1"]


def fastnet_run(prepared_dir, overrides):
    """A quarter-width fastnet on the fixture, deterministic on CPU, and a ``fit`` bound to it."""
    data = load_cache(prepared_dir)
    cfg = load_experiment(
        "smoke", ["model.name=fastnet", "model.width=0.25", "train.batch_size=50", "optim.lr=0.05", *overrides]
    )
    seed_everything(cfg.train.seed, deterministic=True)
    model = create_model("fastnet", width=0.25, mean=data.mean, std=data.std)

    def run(**kwargs):
        return fit(model, data, cfg, CPU, **kwargs)

    return model, run


def test_whitening_bias_learns_then_freezes(prepared_dir):
    model, run = fastnet_run(prepared_dir, ["train.epochs=3", "train.whiten_bias_epochs=1"])
    biases = []
    run(hooks=Hooks(epoch_end=lambda _: biases.append(model.body.whiten.bias.detach().clone())))
    assert biases[0].abs().sum() > 0, "the bias (zero at init) learned in epoch 1"
    assert torch.equal(biases[0], biases[1]) and torch.equal(biases[1], biases[2])
    # Nothing before the first conv needs a gradient now, so backward stops there.
    assert not model.body.whiten(torch.rand(2, 3, 32, 32)).requires_grad


def test_low_res_epochs_train_on_smaller_batches_then_full_size(prepared_dir):
    model, run = fastnet_run(prepared_dir, ["train.epochs=3", "train.low_res_epochs=2", "train.low_res=20"])
    sizes: list[tuple[bool, int]] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append((module.training, args[0].shape[-1])))
    result = run()
    per_epoch = len(load_cache(prepared_dir).labels["train"]) // 50
    trained = [size for training, size in sizes if training]
    assert trained == [20] * 2 * per_epoch + [32] * per_epoch
    assert {size for training, size in sizes if not training} == {32}, "validation stays at full size"
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_freezing_a_stem_the_model_lacks_is_refused_before_training(prepared_dir):
    epochs = []
    with pytest.raises(CifarError, match="whiten_bias_epochs needs a model with a whitening stem.*small_cnn"):
        train_small_model(prepared_dir, ["train.whiten_bias_epochs=1"], callback=epochs.append)
    assert epochs == []
    with pytest.raises(CifarError, match="whiten_bias_epochs must be 0"):
        train_small_model(prepared_dir, ["train.whiten_bias_epochs=-1"])
    with pytest.raises(CifarError, match="train.low_res between 16 and 32 pixels \\(got 8\\)"):
        train_small_model(prepared_dir, ["train.low_res_epochs=1", "train.low_res=8"], callback=epochs.append)
    assert epochs == []


@pytest.mark.parametrize(
    "tricks",
    [AIRBENCH_TRICKS, ["optim.name=muon", "train.low_res_epochs=2", "train.whiten_bias_epochs=1"]],
    ids=["lookahead-altflip-frozen-stem", "muon-low-res"],
)
def test_training_tricks_resume_exactly(prepared_dir, tricks):
    model, run = fastnet_run(prepared_dir, ["train.epochs=3", *tricks])
    reference = run()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, run = fastnet_run(prepared_dir, ["train.epochs=3", *tricks])
    steps = iter(range(10_000))
    with pytest.raises(TrainingInterrupted) as stopped:
        stop_at = 2 * len(load_cache(prepared_dir).labels["train"]) // 50 - 3
        run(hooks=Hooks(should_stop=lambda: next(steps) == stop_at))
    assert stopped.value.state.epoch == 2, "stopped during epoch 2, after the stem froze"
    model, run = fastnet_run(prepared_dir, ["train.epochs=3", *tricks])
    resumed = run(resume=stopped.value.state)
    assert [m.train_loss for m in resumed.history] == [m.train_loss for m in reference.history]
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_fitting_epochs_charges_low_resolution_epochs_their_own_rate():
    from cifar.engine.budget import fitting_epochs

    # 10 steps an epoch: the first at 0.5 s/step (5 s), the rest at 1 s/step (10 s), 1 s validation each
    assert fitting_epochs(6.0, 10, 0.5, 1.0, 1, 1.0) == 1
    assert fitting_epochs(16.9, 10, 0.5, 1.0, 1, 1.0) == 1
    assert fitting_epochs(17.0, 10, 0.5, 1.0, 1, 1.0) == 2
    assert fitting_epochs(17.0, 10, 0.5, 1.0, 0, 1.0) == 1  # without low-res epochs all cost 11 s
    assert fitting_epochs(0.1, 10, 0.5, 1.0, 1, 1.0) == 1  # never fewer than one epoch


def test_a_budget_plan_times_the_low_resolution_epochs_as_they_will_run(prepared_dir):
    """The plan times both step kinds on the real model, fits the epochs by them, and leaves the model as it was."""
    from cifar.engine.budget import SAFETY, fitting_epochs, plan_budget

    data = load_cache(prepared_dir)
    cfg = load_experiment("smoke", ["train.time_budget=20", "train.low_res_epochs=2", "train.low_res=16"])
    model = create_model(cfg.model.name, mean=data.mean, std=data.std)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_budget(model, data, cfg, torch.device("cpu"))
    planned = plan.recipe(cfg)
    assert plan.low_res_step_seconds > 0 and plan.step_seconds > 0
    left = SAFETY * (20 - plan.probe_seconds)  # eval_every 1: every epoch pays its validation pass
    assert (
        planned.train.epochs
        == plan.epochs
        == fitting_epochs(left, plan.steps_per_epoch, plan.low_res_step_seconds, plan.step_seconds, 2, plan.val_seconds)
    )
    assert "low-resolution ones at" in plan.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was probed


class _SlowInput:
    """The real loader with 50 ms more per batch (virtual clock): an input pipeline as costly as heavy augmentation."""

    def __init__(self, loader, clock) -> None:
        self.__dict__.update(inner=loader, clock=clock)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value) -> None:
        setattr(self.inner, name, value)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            self.clock.now += 0.05
            yield batch


def test_the_budget_times_a_step_with_the_batch_it_draws(prepared_dir, clock):
    """On a CPU the loader's gather and augmentation share the cores with the step: the probe counts them."""
    from cifar.engine.budget import _step_seconds

    data = load_cache(prepared_dir)
    cfg = load_experiment("smoke", [])
    model = create_model(cfg.model.name, mean=data.mean, std=data.std)
    run = prepare_training(model, data, cfg, CPU)
    run.wrap()
    assert _step_seconds(run, 1, 3) == pytest.approx(STEP)
    run.loader = _SlowInput(run.loader, clock)
    assert _step_seconds(run, 1, 3) == pytest.approx(STEP + 0.05)


def test_the_compile_warm_up_leaves_the_run_as_it_found_it(prepared_dir):
    """The warm-up's steps are not training: weights, optimizer, schedule and the stem come back."""
    data = load_cache(prepared_dir)
    cfg = load_experiment("smoke", ["model.name=fastnet", "model.width=0.25", "train.batch_size=50", "train.epochs=3",
                                    "train.low_res_epochs=1", "train.whiten_bias_epochs=1", "train.ema_decay=0.9",
                                    "train.lookahead=true"])  # fmt: skip
    model = create_model("fastnet", width=0.25, mean=data.mean, std=data.std)
    run = prepare_training(model, data, cfg, CPU)
    run.wrap()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = {k: v.clone() for k, v in run.ema.state_dict().items()}
    visited = []
    stem = model.body.whiten.bias
    model.register_forward_pre_hook(lambda module, args: visited.append((args[0].shape[-1], stem.requires_grad)))
    warm_up_compile(run, force=True)
    assert visited == [(cfg.train.low_res, True), (32, False)], "one step at low resolution, one with the stem frozen"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, averaged[k]) for k, v in run.ema.state_dict().items())
    assert run.optimizer.state_dict()["state"] == {} and run.scheduler.last_epoch == 0
    assert model.body.whiten.bias.requires_grad and run.step_model is model


@pytest.mark.slow
def test_compiled_training_compiles_before_the_clock_and_never_inside_it(prepared_dir):
    """torch.compile on the low-resolution epoch, the full-size ones and after the stem freezes:
    every graph is built by the warm-up, none inside the timed loop."""
    model, run = fastnet_run(prepared_dir, ["train.epochs=3", "train.low_res_epochs=1", "train.low_res=24",
                                            "train.whiten_bias_epochs=2", "train.compile=true"])  # fmt: skip
    before = compiled_graphs()
    result = run()
    assert compiled_graphs() - before >= 3, "the warm-up compiled each of the three states"
    assert result.recompiles == 0 and result.compile_seconds > 0
    assert result.history[-1].train_loss < result.history[0].train_loss

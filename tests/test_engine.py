"""The training loop learns real images, picks the best epoch on validation, and is reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_small_model

from cifar.data import load_cache
from cifar.engine import evaluate
from cifar.errors import CifarError
from cifar.models import create_model

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

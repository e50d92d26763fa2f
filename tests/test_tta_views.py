"""benchmarks/tta_views.py: saved weights really scored under each TTA, each as evaluation scores it."""

from __future__ import annotations

import sys

import numpy as np
import torch
from conftest import ROOT, train_small_model

sys.path.insert(0, str(ROOT / "benchmarks"))

import tta_views  # noqa: E402

from cifar.engine import evaluate, native_bf16  # noqa: E402
from cifar.run.export import model_metadata, save_weights  # noqa: E402


def test_each_setting_scores_the_saved_weights_with_its_own_views(prepared_dir, tmp_path):
    data, cfg, model, _ = train_small_model(prepared_dir)
    folder = tmp_path / "weights"
    save_weights(model, folder, model_metadata(cfg.model.name, cfg.model.width, data.classes, data.mean, data.std))
    cpu = torch.device("cpu")

    scores = tta_views.score(folder, data, cpu)

    assert list(scores) == [name for name, _, _ in tta_views.SETTINGS]
    logits = {}
    for name, tta, translate in tta_views.SETTINGS:
        got = evaluate(model, data.images["test"], data.labels["test"], device=cpu, tta=tta, tta_translate=translate,
                       amp=native_bf16(cpu))  # fmt: skip
        assert scores[name]["test"] == 100 * got.accuracy
        assert 10 < scores[name]["val"] <= 100  # a trained model, scored on the validation split too
        logits[name] = got.logits
    # the four settings are four different scorings of the same weights, not one repeated
    assert len({np.round(v, 4).tobytes() for v in logits.values()}) == 4

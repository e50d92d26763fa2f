"""Calibrated confidence, "none of these" detection, occlusion maps and corruption robustness.

Pure functions on constructed data, then the real bundled model (ONNX Runtime) on real CIFAR-10
test images, then the CLIs and the registry on a real SQLite store.
"""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
from conftest import ROOT, png_bytes, run_cli, train_small_model
from PIL import Image

from cifar import registry
from cifar.bundle import BUNDLE_DIR
from cifar.corruptions import CORRUPTIONS, corrupt
from cifar.errors import CifarError
from cifar.export import export_onnx, model_metadata
from cifar.inference import NOT_ONE_OF_THE_CLASSES, Predictor
from cifar.metrics import expected_calibration_error, softmax
from cifar.tracking import log_onnx_model
from cifar.trust import (
    auroc,
    fit_temperature,
    generated_ood_images,
    in_distribution_score,
    occlusion_map,
    scaled_nll,
)


@pytest.fixture(scope="module")
def bundled() -> Predictor:
    return Predictor.from_uri(str(BUNDLE_DIR))


# --- pure functions -----------------------------------------------------------------------------


def test_temperature_softens_overconfident_logits_and_sharpens_timid_ones():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 4000)
    logits = rng.normal(0, 1, (4000, 10))
    logits[np.arange(4000), labels] += 2.0
    assert fit_temperature(logits * 4, labels) > 1.5  # overconfident: spread out
    assert fit_temperature(logits / 4, labels) < 0.7  # underconfident: sharpened
    t = fit_temperature(logits, labels)
    for other in (t * 0.8, t * 1.25):  # the minimum of NLL, not just a better point
        assert scaled_nll(logits, labels, t) <= scaled_nll(logits, labels, other)


def test_auroc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    inside, outside = rng.normal(1, 1, 300).round(1), rng.normal(0, 1, 200).round(1)  # with ties
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[inside, outside])
    assert auroc(inside, outside) == pytest.approx(expected, abs=1e-12)


def test_occlusion_map_highlights_the_region_that_decides_the_class():
    """A classifier that says 'class 0' when the top-left 10x10 square is bright, on a dark image."""
    image = np.full((32, 32, 3), 20, np.uint8)
    image[2:12, 2:12] = 250

    def probabilities(batch: np.ndarray) -> np.ndarray:
        square = batch[:, 2:12, 2:12].astype(np.float64).mean(axis=(1, 2, 3)) / 255
        return softmax(np.stack([12 * square, np.full(len(batch), 4.0)], axis=1))

    heat = occlusion_map(probabilities, image, target=0)
    inside = np.zeros((32, 32), bool)
    inside[2:12, 2:12] = True
    assert heat.shape == (32, 32)
    assert heat[inside].mean() > 0.02 and np.abs(heat[~inside]).mean() < heat[inside].mean() / 5
    assert np.unravel_index(heat.argmax(), heat.shape) in {(y, x) for y in range(2, 12) for x in range(2, 12)}


def test_corruptions_are_reproducible_and_grow_with_severity(mini_raw):
    images = mini_raw.test_images[:50]
    for name in CORRUPTIONS:
        a, b = corrupt(images, name, 3, seed=7), corrupt(images, name, 3, seed=7)
        assert a.dtype == np.uint8 and a.shape == images.shape and np.array_equal(a, b)
        change = [np.abs(corrupt(images, name, s).astype(int) - images).mean() for s in (1, 5)]
        assert change[1] > change[0] > 0, name
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "rain", 1)


# --- the real bundled model on real images -----------------------------------------------------


def test_temperature_scaling_reduces_nll_on_held_out_images(bundled, mini_raw):
    logits, labels = bundled.logits(mini_raw.test_images), mini_raw.test_labels
    fit_half, held_out = slice(0, 100), slice(100, None)
    t = fit_temperature(logits[fit_half], labels[fit_half])
    assert scaled_nll(logits[held_out], labels[held_out], t) < 0.8 * scaled_nll(logits[held_out], labels[held_out])
    before = expected_calibration_error(softmax(logits[held_out]), labels[held_out])
    after = expected_calibration_error(softmax(logits[held_out] / t), labels[held_out])
    assert after < before


def test_ood_flag_rejects_noise_and_accepts_test_images_at_the_documented_rate(bundled, mini_raw):
    assert bundled.trust.ood_threshold is not None and bundled.trust.accept_rate == 0.95
    accepted = [p.in_distribution for p in bundled.predict_arrays(mini_raw.test_images)]
    assert 0.88 <= np.mean(accepted) <= 1.0  # 95% of validation images by construction; 200 test images here
    noise = next(s for s in generated_ood_images(200, seed=1) if s.name == "noise")
    rejected = [not p.in_distribution for p in bundled.predict_arrays(noise.images)]
    assert np.mean(rejected) >= 0.9
    scores = in_distribution_score(bundled.logits(noise.images), bundled.trust.temperature)
    assert auroc(in_distribution_score(bundled.logits(mini_raw.test_images), bundled.trust.temperature), scores) > 0.9


def test_severity_5_corruptions_lower_accuracy(bundled, mini_raw):
    images, labels = mini_raw.test_images, mini_raw.test_labels
    clean = (bundled.logits(images).argmax(1) == labels).mean()
    for name in CORRUPTIONS:
        corrupted = (bundled.logits(corrupt(images, name, 5)).argmax(1) == labels).mean()
        assert corrupted < clean, f"{name} at severity 5: {corrupted:.3f} vs clean {clean:.3f}"


def test_explain_runs_on_the_onnx_model(bundled, mini_raw):
    heat = bundled.explain(mini_raw.test_images[60], stride=4)
    assert heat.shape == (32, 32) and np.isfinite(heat).all() and heat.max() > 0


def test_a_damaged_trust_profile_is_refused(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(BUNDLE_DIR, folder)
    (folder / "trust.json").write_text('{"temperature": -1, "ood_threshold": 2.0}')
    with pytest.raises(CifarError, match="trust profile .* unusable"):
        Predictor.from_uri(str(folder))
    (folder / "trust.json").write_text("{not json")
    with pytest.raises(CifarError, match="trust.json is not readable JSON"):
        Predictor.from_uri(str(folder))


@pytest.mark.integration
def test_predict_cli_says_none_of_these_and_explains(tmp_path, mini_raw):
    noise = tmp_path / "static.png"
    noise.write_bytes(png_bytes(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    cat = tmp_path / "cat.png"
    Image.fromarray(mini_raw.test_images[60]).resize((96, 96)).save(cat)
    args = ["-m", "cifar.predict", str(noise), str(cat), "--model-uri", str(BUNDLE_DIR)]
    text = run_cli(args)
    assert text.returncode == 0, text.stderr
    assert f"static.png: {NOT_ONE_OF_THE_CLASSES} (best guess" in text.stdout
    assert "cat.png: cat (" in text.stdout
    result = run_cli([*args, "--json", "--explain", str(tmp_path / "maps")])
    records = json.loads(result.stdout)
    assert [r["in_distribution"] for r in records] == [False, True]
    for record in records:
        with Image.open(record["explanation"]) as im:
            assert im.size == (192, 192) and im.mode == "RGB"


# --- training, calibrate, robustness, register -------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_training_run_stores_and_reports_its_trust_profile(tracking_env, prepared_dir, monkeypatch):
    from cifar.config import load_experiment
    from cifar.training import TrainOptions, train_experiment

    cfg = load_experiment("smoke", ["train.epochs=3", "train.batch_size=50"])
    outcome = train_experiment(cfg, TrainOptions(data_dir=prepared_dir, device="cpu", progress=False))
    run = mlflow.get_run(outcome.run_id)
    m = run.data.metrics
    assert m["test_nll_calibrated"] <= m["test_nll_uncalibrated"] + 0.05  # fitted on val, measured on test
    assert {"ood_auroc_noise", "ood_auroc_flat", "ood_false_accept_noise", "ood_accept_rate_in"} <= set(m)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "trust")}
    figures = {"reliability_uncalibrated.png", "reliability_calibrated.png", "ood_scores.png"}
    assert {f"trust/{name}" for name in figures} <= artifacts
    served = Predictor.from_uri(outcome.model_uri)  # the temperature travels inside the logged ONNX model
    assert served.trust.temperature == pytest.approx(m["temperature"])
    assert served.trust.ood_threshold == pytest.approx(m["ood_threshold"])


@pytest.fixture
def old_run(tracking_env, prepared_dir, monkeypatch):
    """A run logged before calibration existed: metrics and an ONNX model, no trust profile."""
    monkeypatch.setenv("CIFAR_DATA", str(prepared_dir))
    data, _, model, _ = train_small_model(prepared_dir, ["train.epochs=4"])
    meta = model_metadata("small_cnn", 1.0, data.classes, data.mean, data.std)
    proto = export_onnx(model, tracking_env_path(tracking_env) / "m.onnx", meta)
    mlflow.set_experiment("older")
    with mlflow.start_run() as run:
        mlflow.log_metrics({"best_val_accuracy": 0.5, "test_accuracy": 0.5})
        uri = log_onnx_model(proto, meta, np.zeros((1, 3, 32, 32), np.float32))
        mlflow.set_tags({"model_uri": uri, "git_commit": "abc", "data_digest": data.digest})
    return run.info.run_id, uri, {"MLFLOW_TRACKING_URI": tracking_env, "CIFAR_DATA": str(prepared_dir)}


def tracking_env_path(uri: str):
    from pathlib import Path

    return Path(uri.removeprefix("sqlite:///")).parent


@pytest.mark.integration
@pytest.mark.slow
def test_trust_gates_calibrate_and_robustness_through_the_clis(old_run):
    run_id, model_uri, env = old_run
    cwd = tracking_env_path(env["MLFLOW_TRACKING_URI"])
    assert Predictor.from_uri(model_uri).trust.temperature == 1.0

    gated = run_cli([str(ROOT / "register.py"), "--max-ece", "0.5", "--robustness-images", "40"], env=env, cwd=cwd)
    assert gated.returncode == 1 and "Not registered" in gated.stderr and "Traceback" not in gated.stderr
    assert "KEEP production" in gated.stdout and f"python -m cifar.calibrate --run-id {run_id}" in gated.stdout
    assert registry.production_version() is None and not registry.list_versions()

    calibrated = run_cli(["-m", "cifar.calibrate", "--run-id", run_id], env=env, cwd=cwd)
    assert calibrated.returncode == 0, calibrated.stderr
    metrics = mlflow.get_run(run_id).data.metrics
    assert Predictor.from_uri(model_uri).trust.temperature == pytest.approx(metrics["temperature"])
    assert metrics["temperature"] != 1.0 and "ood_auroc_noise" in metrics

    too_strict = run_cli([str(ROOT / "register.py"), "--min-ood-auroc", "1.01"], env=env, cwd=cwd)
    assert too_strict.returncode == 1 and "is below --min-ood-auroc 1.01" in too_strict.stdout
    assert registry.production_version() is None
    promoted = run_cli([str(ROOT / "register.py"), "--max-ece", "0.5", "--robustness-images", "40"], env=env, cwd=cwd)
    assert promoted.returncode == 0 and "PROMOTE" in promoted.stdout, promoted.stdout + promoted.stderr
    version = registry.production_version()
    assert float(version.tags["test_ece"]) == pytest.approx(metrics["test_ece_calibrated"], abs=1e-6)
    assert 0 <= float(version.tags["mean_corruption_accuracy"]) <= 1 and "ood_auroc" in version.tags
    listing = run_cli([str(ROOT / "register.py"), "--list"], env=env, cwd=cwd)
    assert "test_ece" in listing.stdout and "corruption_acc" in listing.stdout

    robust = run_cli(["-m", "cifar.robustness", "--images", "40"], env=env, cwd=cwd)
    assert robust.returncode == 0, robust.stderr
    version = registry.production_version()
    robustness_run = mlflow.get_run(version.tags["robustness_run_id"])
    assert robustness_run.data.metrics["mean_corruption_accuracy"] == pytest.approx(
        float(version.tags["mean_corruption_accuracy"]), abs=1e-6
    )
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(robustness_run.info.run_id, "robustness")}
    assert files == {"robustness/corruption_accuracy.csv", "robustness/corruption_accuracy.png"}

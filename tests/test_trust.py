"""Calibrated confidence, "none of these" detection, occlusion maps and corruption robustness.

Pure functions on constructed data, then the real bundled model (ONNX Runtime) on real CIFAR-10
test images, then the CLIs and the registry on a real SQLite store, where a run without its
trust figures is gated, calibrated by ``cifar.assess.recalibrate``, promoted and assessed.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from conftest import ROOT, log_served, png_bytes, run_cli, served_small_model
from PIL import Image

from cifar.assess.corruptions import CORRUPTIONS, corrupt
from cifar.contract.trust import ACCEPT_RATE
from cifar.data import load_cache
from cifar.errors import CifarError
from cifar.metrics import expected_calibration_error, softmax
from cifar.promote import registry
from cifar.promote.bundle import BUNDLE_DIR
from cifar.run.calibration import auroc, fashion_mnist_images, fit_temperature, generated_ood_images, scaled_nll
from cifar.serve.inference import NOT_ONE_OF_THE_CLASSES, Predictor
from cifar.serve.occlusion import occlusion_map


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
    inside, outside = rng.normal(0, 1, 300).round(1), rng.normal(1, 1, 200).round(1)  # with ties
    expected = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[inside, outside])  # outliers score higher
    assert auroc(inside, outside) == pytest.approx(expected, abs=1e-12) and expected > 0.7


def test_fashion_mnist_is_installed():
    """CI measures the OOD score on real clothing photos: a missing package fails here, not silently."""
    assert fashion_mnist_images(10) is not None, (
        "Fashion-MNIST is missing: install Debian's dataset-fashion-mnist (make system-deps) or set CIFAR_FASHION_MNIST"
    )


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


def test_ood_flag_rejects_outliers_and_accepts_test_images_at_the_documented_rate(bundled, mini_raw):
    assert bundled.trust.ood_threshold is not None and bundled.trust.accept_rate == ACCEPT_RATE
    inside = bundled.run(mini_raw.test_images)
    assert 0.9 <= inside["in_distribution"].mean() <= 1.0  # 96% of validation images by construction; 200 here
    sets = {s.name: s.images[:200] for s in generated_ood_images(200, seed=1)}
    sets["fashion_mnist"] = fashion_mnist_images(300).images
    for name, images in sets.items():  # the bundled model's card: AUROC >= 0.98, few accepted
        outside = bundled.run(images)
        assert auroc(inside["ood_score"], outside["ood_score"]) > 0.95, name
        assert outside["in_distribution"].mean() <= 0.2, name
    predictions = bundled.predict_arrays(sets["noise"][:20])
    assert not any(p.in_distribution for p in predictions) and all(
        p.ood_score > bundled.trust.ood_threshold for p in predictions
    )


def test_severity_5_corruptions_lower_accuracy(bundled, mini_raw):
    images, labels = mini_raw.test_images, mini_raw.test_labels
    clean = (bundled.predicted_classes(images) == labels).mean()
    for name in CORRUPTIONS:
        corrupted = (bundled.predicted_classes(corrupt(images, name, 5)) == labels).mean()
        assert corrupted < clean, f"{name} at severity 5: {corrupted:.3f} vs clean {clean:.3f}"


def test_explain_runs_on_the_onnx_model(bundled, mini_raw):
    heat = bundled.explain(mini_raw.test_images[60], stride=4)
    assert heat.shape == (32, 32) and np.isfinite(heat).all() and heat.max() > 0


def test_a_damaged_trust_record_is_refused(tmp_path):
    import onnx

    from cifar.contract import schema

    proto = onnx.load(str(BUNDLE_DIR / "model.onnx"))
    metadata = schema.metadata_of(proto)
    schema.set_metadata(proto, {**metadata, "trust": {**metadata["trust"], "temperature": -1}})
    onnx.save(proto, str(tmp_path / "model.onnx"))
    with pytest.raises(CifarError, match="trust record .* unusable"):
        Predictor.from_uri(str(tmp_path / "model.onnx"))


@pytest.mark.integration
def test_predict_cli_says_none_of_these_and_explains(tmp_path, mini_raw):
    noise = tmp_path / "static.png"
    noise.write_bytes(png_bytes(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    cat = tmp_path / "cat.png"
    Image.fromarray(mini_raw.test_images[60]).resize((96, 96)).save(cat)
    args = ["-m", "cifar.serve.predict", str(noise), str(cat), "--model-uri", str(BUNDLE_DIR)]
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
    from cifar.run.training import TrainOptions, train_experiment

    cfg = load_experiment("smoke", ["train.epochs=3", "train.batch_size=50"])
    outcome = train_experiment(cfg, TrainOptions(data_dir=prepared_dir, device="cpu", progress=False))
    run = mlflow.get_run(outcome.run_id)
    m = run.data.metrics
    assert m["test/nll_calibrated"] <= m["test/nll_uncalibrated"] + 0.05  # fitted on val, measured on test
    for name in ("noise", "flat", "fashion_mnist"):
        assert {f"ood/auroc_{name}", f"ood/false_accept_{name}"} <= set(m), name
    assert "ood_not_measured" not in run.data.tags and m["ood/accept_rate_in"] > 0.8
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "trust")}
    figures = {"reliability_uncalibrated.png", "reliability_calibrated.png", "ood_scores.png"}
    assert {f"trust/{name}" for name in figures} <= artifacts
    served = Predictor.from_uri(outcome.model_uri)  # the constants travel inside the logged graph
    assert served.trust.temperature == pytest.approx(m["calibration/temperature"])
    assert served.trust.ood_threshold == pytest.approx(m["ood/threshold"])
    # The temperature was fitted on validation: there the served probabilities beat the raw softmax.
    data = load_cache(prepared_dir)
    out, labels = served.run(np.asarray(data.images["val"])), data.labels["val"]

    def nll(p: np.ndarray) -> float:
        return float(-np.log(p[np.arange(len(labels)), labels] + 1e-12).mean())

    assert nll(out["probabilities"]) < nll(softmax(out["logits"])) - 1e-3


@pytest.mark.integration
@pytest.mark.slow
def test_a_missing_ood_set_is_recorded_as_not_measured(tracking_env, prepared_dir, monkeypatch, tmp_path, capsys):
    from cifar.config import load_experiment
    from cifar.run import calibration
    from cifar.run.calibration import FASHION_MNIST_MISSING
    from cifar.run.training import TrainOptions, train_experiment

    monkeypatch.setenv("CIFAR_FASHION_MNIST", str(tmp_path / "nowhere"))
    calibration.ood_sets.cache_clear()
    try:
        cfg = load_experiment("smoke", ["train.epochs=1", "train.batch_size=50"])
        outcome = train_experiment(cfg, TrainOptions(data_dir=prepared_dir, device="cpu", progress=True))
    finally:
        calibration.ood_sets.cache_clear()
    run = mlflow.get_run(outcome.run_id)
    assert run.data.tags["ood_not_measured"] == "fashion_mnist"
    assert "ood/auroc_fashion_mnist" not in run.data.metrics and "ood/auroc_noise" in run.data.metrics
    printed = [line for line in capsys.readouterr().out.splitlines() if "fashion_mnist" in line]
    assert printed == [f"OOD set fashion_mnist {FASHION_MNIST_MISSING}"]
    assert "dataset-fashion-mnist" in printed[0]
    candidate = registry.find_best_run()
    assert candidate.ood_not_measured == ("fashion_mnist",) and "not measured: fashion_mnist" in candidate.ood_basis


@pytest.fixture
def uncalibrated_run(tracking_env, prepared_dir, monkeypatch):
    """A run that logged a served model and its accuracy but none of its trust figures (a notebook's run)."""
    monkeypatch.setenv("CIFAR_DATA", str(prepared_dir))
    data, served = served_small_model(prepared_dir, ["train.epochs=4"])
    mlflow.set_experiment("notebook")
    with mlflow.start_run() as run:
        uri = log_served(served, data)
        mlflow.log_metrics({"val/best_accuracy": 0.5, "test/accuracy": 0.5}, model_id=uri.removeprefix("models:/"))
        mlflow.set_tags({"model_uri": uri, "git_commit": "abc", "data_digest": data.digest})
    return run.info.run_id, uri, {"MLFLOW_TRACKING_URI": tracking_env, "CIFAR_DATA": str(prepared_dir)}


def tracking_env_path(uri: str):
    from pathlib import Path

    return Path(uri.removeprefix("sqlite:///")).parent


@pytest.mark.integration
@pytest.mark.slow
def test_an_uncalibrated_run_is_gated_then_calibrated_then_promoted_and_assessed(uncalibrated_run):
    run_id, model_uri, env = uncalibrated_run
    cwd = tracking_env_path(env["MLFLOW_TRACKING_URI"])
    gated = run_cli([str(ROOT / "register.py"), "--max-ece", "0.5", "--robustness-images", "40"], env=env, cwd=cwd)
    assert gated.returncode == 1 and "Not registered" in gated.stderr and "Traceback" not in gated.stderr
    assert "KEEP production" in gated.stdout and f"python -m cifar calibrate --run-id {run_id}" in gated.stdout
    assert registry.production_version() is None and not registry.list_versions()

    calibrated = run_cli(["-m", "cifar.assess.recalibrate", "--run-id", run_id], env=env, cwd=cwd)
    assert calibrated.returncode == 0, calibrated.stderr
    assert "rewrote model" in calibrated.stdout and "fashion_mnist AUROC" in calibrated.stdout
    metrics = mlflow.get_run(run_id).data.metrics  # the refit's figures, under the current names
    served = Predictor.from_uri(model_uri)  # the same logged model, its constants rewritten in place
    temperature = metrics["calibration/temperature"]
    assert served.trust.temperature == pytest.approx(temperature) and temperature != 1.0
    assert served.predict_arrays(generated_ood_images(5)[0].images)[0].in_distribution is False
    spec = mlflow.models.get_model_info(model_uri).signature.to_dict()
    assert "uint8" in spec["inputs"] and "probabilities" in spec["outputs"]

    too_strict = run_cli([str(ROOT / "register.py"), "--min-ood-auroc", "1.01"], env=env, cwd=cwd)
    assert too_strict.returncode == 1 and "is below --min-ood-auroc 1.01" in too_strict.stdout
    assert "(the lowest of noise" in too_strict.stdout and "fashion_mnist" in too_strict.stdout
    assert registry.production_version() is None
    promoted = run_cli([str(ROOT / "register.py"), "--max-ece", "0.5", "--robustness-images", "40"], env=env, cwd=cwd)
    assert promoted.returncode == 0 and "PROMOTE" in promoted.stdout, promoted.stdout + promoted.stderr
    assert "OOD AUROC of the candidate: the lowest of noise" in promoted.stdout
    version = registry.production_version()
    assert float(version.tags["test_ece"]) == pytest.approx(metrics["test/ece_calibrated"], abs=1e-6)
    assert version.tags["ood_auroc_sets"] == "noise,flat,fashion_mnist"
    assert float(version.tags["ood_auroc"]) == pytest.approx(
        min(metrics[f"ood/auroc_{s}"] for s in ("noise", "flat", "fashion_mnist")), abs=1e-6
    )
    assert 0 <= float(version.tags["mean_corruption_accuracy"]) <= 1
    listing = run_cli([str(ROOT / "register.py"), "--list"], env=env, cwd=cwd)
    assert "test_ece" in listing.stdout and "corruption_acc" in listing.stdout

    refit = run_cli(
        ["-m", "cifar.assess.recalibrate", "--model-uri", "models:/cifar10-classifier@production"], env=env, cwd=cwd
    )
    assert refit.returncode == 0 and "rewrote model" in refit.stdout

    robust = run_cli(["-m", "cifar.assess.robustness", "--images", "40"], env=env, cwd=cwd)
    assert robust.returncode == 0, robust.stderr
    version = registry.production_version()
    robustness_run = mlflow.get_run(version.tags["robustness_run_id"])
    assert robustness_run.data.metrics["robustness/mean_corruption_accuracy"] == pytest.approx(
        float(version.tags["mean_corruption_accuracy"]), abs=1e-6
    )
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(robustness_run.info.run_id, "robustness")}
    assert files == {"robustness/corruption_accuracy.csv", "robustness/corruption_accuracy.png"}


def test_a_graph_outside_the_served_contract_is_refused_with_one_message(tmp_path, prepared_dir):
    """A plain exported network (float N x 3 x 32 x 32 in, logits out) has no constants to refit."""
    import torch

    from cifar.engine.models import create_model

    (tmp_path / "plain").mkdir()
    path = str(tmp_path / "plain" / "model.onnx")
    torch.onnx.export(create_model("small_cnn").eval(), (torch.rand(2, 3, 32, 32),), path, dynamo=False,
                      input_names=["image"], output_names=["logits"], opset_version=18)  # fmt: skip
    env = {"CIFAR_DATA": str(prepared_dir)}
    result = run_cli(["-m", "cifar.assess.recalibrate", "--model-uri", str(tmp_path / "plain")], env=env)
    assert result.returncode == 2 and "is not a served model of this project" in result.stderr
    assert "python train.py" in result.stderr and "Traceback" not in result.stderr


def test_the_other_real_dataset_is_the_out_of_distribution_set(prepared_dir, tmp_path, monkeypatch):
    """A Fashion-MNIST model is measured on CIFAR-10's test images, any other on Fashion-MNIST's."""
    from cifar.run import calibration
    from cifar.settings import load_settings

    def sets_with(data_dir, dataset):
        monkeypatch.setenv("CIFAR_DATA", str(data_dir))
        load_settings()
        calibration.ood_sets.cache_clear()
        return calibration.ood_sets(dataset)

    try:
        sets, missing = sets_with(prepared_dir, "fashion-mnist")
        assert [s.name for s in sets] == ["noise", "flat", "cifar10"] and missing == {}
        cifar = load_cache(prepared_dir).images["test"]
        assert np.array_equal(sets[2].images, cifar[: len(sets[2].images)])
        assert [s.name for s in sets_with(prepared_dir, "cifar10")[0]] == ["noise", "flat", "fashion_mnist"]
        sets, missing = sets_with(tmp_path, "fashion-mnist")  # no CIFAR-10 prepared there
        assert [s.name for s in sets] == ["noise", "flat"] and missing == {"cifar10": calibration.CIFAR10_MISSING}
    finally:
        monkeypatch.delenv("CIFAR_DATA")
        load_settings()
        calibration.ood_sets.cache_clear()

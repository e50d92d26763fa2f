"""The evaluation report: numbers checked against hand computations; the CLI on a registered model."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from conftest import ROOT, run_cli

from cifar.metrics import calibration_bins, expected_calibration_error, most_confused_pairs, softmax
from cifar.promote.bundle import import_bundled
from cifar.run.classification_report import build_report, report_figures

CLASSES = ("a", "b", "c")


def test_confusion_and_pairs_match_a_hand_count():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = np.array([0, 1, 1, 1, 0, 2, 2, 1, 2])
    report = build_report(softmax(np.eye(3)[predictions] * 5.0), labels, CLASSES)
    assert report.confusion.tolist() == [[1, 2, 0], [1, 1, 0], [0, 1, 3]]
    assert report.accuracy == pytest.approx(5 / 9)
    pairs = most_confused_pairs(report.confusion, CLASSES)
    assert pairs.iloc[0][["true", "predicted", "count"]].tolist() == ["a", "b", 2]
    assert len(pairs) == 3  # exactly three non-zero off-diagonal cells
    row_a = report.per_class.set_index("class").loc["a"]
    assert row_a["recall"] == pytest.approx(1 / 3) and row_a["precision"] == pytest.approx(1 / 2)


def test_misclassified_are_sorted_by_loss():
    labels = np.array([0, 1, 2, 0])
    probabilities = softmax(np.array([[0, 3, 0], [0, 5, 0], [4, 0, 0], [0, 0, 1.0]]))  # 0, 2, 3 wrong
    table = build_report(probabilities, labels, CLASSES).misclassified
    losses = -np.log(probabilities[[0, 2, 3], [0, 2, 0]])
    assert table["index"].tolist() == [int(i) for i in np.array([0, 2, 3])[np.argsort(-losses)]]
    assert table["loss"].is_monotonic_decreasing


def test_ece_matches_a_hand_computation():
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    # Bins with images: confidence 0.95 (accuracy 1/2) and 0.55 (accuracy 1): ECE = 0.5*0.45 + 0.5*0.45
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.45)
    bins = calibration_bins(probabilities, labels, bins=10)
    assert bins["count"].sum() == 4 and bins.loc[bins["count"] > 0, "accuracy"].tolist() == [1.0, 0.5]


def test_figures_render(mini_raw):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10)) + np.eye(10)[mini_raw.test_labels] * 2
    report = build_report(softmax(logits), mini_raw.test_labels, mini_raw.classes)
    figures = report_figures(report, mini_raw.test_images)
    assert set(figures) == {
        "confusion_matrix.png",
        "per_class_metrics.png",
        "reliability_diagram.png",
        "misclassified.png",
    }
    for figure in figures.values():
        assert figure.get_axes()


@pytest.mark.integration
def test_evaluate_cli_on_the_production_model(tracking_env, prepared_dir):

    version, _ = import_bundled()
    env = {"MLFLOW_TRACKING_URI": tracking_env, "CIFAR_DATA": str(prepared_dir)}
    result = run_cli(["-m", "cifar.assess.evaluate"], env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert run.data.tags["registered_model_version"] == version
    assert client.get_model_version("cifar10-classifier", version).tags["evaluation_run_id"] == run.info.run_id
    assert run.data.metrics["test/accuracy"] > 0.85 and 0 < run.data.metrics["test/ece"] < 0.5
    # the report reads the graph's calibrated probabilities: its ECE is the calibrated one, not softmax(logits)'s
    from cifar.data import load_cache
    from cifar.serve.inference import Predictor

    served, data = Predictor.from_uri("models:/cifar10-classifier@production"), load_cache(prepared_dir)
    out = served.run(np.asarray(data.images["test"]))
    calibrated = expected_calibration_error(out["probabilities"].astype(np.float64), data.labels["test"])
    raw = expected_calibration_error(softmax(out["logits"].astype(np.float64)), data.labels["test"])
    assert run.data.metrics["test/ece"] == pytest.approx(calibrated, abs=1e-6) and abs(calibrated - raw) > 0.05
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/per_class_metrics.png",
        "evaluation/reliability_diagram.png",
        "evaluation/misclassified.png",
        "evaluation/most_confused_pairs.csv",
    } <= files

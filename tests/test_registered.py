"""cifar.contract.registered_model: the version-tag schema round-trips, and models:/ URIs resolve in a real registry."""

from __future__ import annotations

import mlflow
import pytest
from conftest import log_served, served_small_model

from cifar.contract.registered_model import (
    MODEL_NAME,
    PRODUCTION,
    PRODUCTION_URI,
    VersionTags,
    logged_model_id,
    pinned_uri,
    registered_version,
)


def test_version_tags_round_trip_as_the_registry_stores_them():
    tags = VersionTags(
        run_id="abc",
        val_accuracy=0.9,
        test_accuracy=0.88,
        source="training run",
        precision="int8",
        extra={"int8_val_agreement": "0.990000"},
    )
    stored = tags.to_tags()
    assert stored["val_accuracy"] == "0.900000" and stored["precision"] == "int8"
    assert "test_ece" not in stored and "study" not in stored  # empty fields are not written
    assert VersionTags.from_tags(stored) == tags
    assert VersionTags.from_tags({"val_accuracy": "", "someone_elses": "x"}).val_accuracy is None
    assert VersionTags.from_tags({}).precision_name == "float32"


def test_trust_figures_come_from_a_runs_metrics():
    metrics = {"test_ece_calibrated": 0.02, "temperature": 1.3, "ood_auroc_noise": 0.99, "ood_auroc_flat": 0.95}
    tags = VersionTags().with_trust(metrics, corruption=0.7)
    assert tags.ood_auroc == 0.95 and tags.ood_auroc_sets == "noise,flat"  # the lowest, and over which sets
    assert tags.trust() == {
        "test_ece": "0.020000",
        "ood_auroc": "0.950000",
        "ood_auroc_sets": "noise,flat",
        "mean_corruption_accuracy": "0.700000",
        "temperature": "1.300000",
    }


@pytest.mark.integration
def test_models_uris_resolve_in_a_real_registry(tracking_env, prepared_dir):
    data, served = served_small_model(prepared_dir, ["train.epochs=1"])
    mlflow.set_experiment("uris")
    with mlflow.start_run():
        uri = log_served(served, data)
    client = mlflow.MlflowClient()
    version = mlflow.register_model(uri, MODEL_NAME)
    client.set_registered_model_alias(MODEL_NAME, PRODUCTION, version.version)
    assert PRODUCTION_URI == f"models:/{MODEL_NAME}@{PRODUCTION}"
    assert registered_version(PRODUCTION_URI).version == version.version
    assert registered_version(f"models:/{MODEL_NAME}/{version.version}").version == version.version
    assert registered_version(uri) is None and registered_version("runs:/abc/model") is None
    assert pinned_uri(PRODUCTION_URI) == f"models:/{MODEL_NAME}/{version.version}"
    assert pinned_uri(uri) == uri
    model_id = uri.removeprefix("models:/")
    assert logged_model_id(uri) == model_id and logged_model_id(PRODUCTION_URI) == model_id
    with pytest.raises(mlflow.exceptions.MlflowException):
        registered_version(f"models:/{MODEL_NAME}@no-such-alias")

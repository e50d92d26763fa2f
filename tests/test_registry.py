"""register.py: chosen on validation, champion/challenger, --force, rollback, empty stores.

Concurrent promotions: test_promotion_race.py.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from conftest import ROOT, log_served, run_cli, served_small_model

from cifar.data import load_cache
from cifar.errors import CifarError
from cifar.promote import registry

pytestmark = pytest.mark.integration
NAME = registry.MODEL_NAME


@pytest.fixture(scope="module")
def trained_proto(prepared_dir):
    """A small model really trained on the fixture (better than chance), as the served graph."""
    return served_small_model(prepared_dir, ["train.epochs=5"])


@pytest.fixture
def store(tracking_env, prepared_dir, monkeypatch):
    monkeypatch.setenv("CIFAR_DATA", str(prepared_dir))
    return tracking_env


def make_run(experiment: str, val: float, test: float, proto_meta, layout: str = "linked") -> str:
    """A finished run as training leaves it: an ONNX MLflow model and its metrics.

    ``linked``: the current layout, metrics linked to the model; ``old``: before 2026-12-02, the
    run's metrics only, under the old names.
    """
    data, served = proto_meta
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        uri = log_served(served, data)
        if layout == "linked":
            mlflow.log_metrics({"val/best_accuracy": val, "test/accuracy": test}, model_id=uri.removeprefix("models:/"))
        else:
            mlflow.log_metrics({"best_val_accuracy": val, "test_accuracy": test})
        mlflow.set_tags({"model_uri": uri, "git_commit": "abc", "data_digest": "d"})
    return run.info.run_id


def promote(**kwargs):
    c = registry.find_best_run(kwargs.pop("experiments", None), kwargs.pop("study", None))
    return registry.register_and_promote(
        registry.decide(c, NAME, kwargs.pop("min_improvement", 0.0), kwargs.pop("force", False)), NAME
    )


def production_run():
    return registry.production_version(NAME).run_id


def production_stages():
    versions = mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")
    return sorted(v.version for v in versions if v.current_stage == "Production")


def test_chooses_on_validation_not_test(store, trained_proto):
    by_val = make_run("a", val=0.9, test=0.2, proto_meta=trained_proto)
    make_run("a", val=0.5, test=0.99, proto_meta=trained_proto)  # best on test, worse on val
    decision = promote()
    assert decision.promote and production_run() == by_val
    version = registry.production_version(NAME)
    assert version.tags["val_accuracy"] == "0.900000" and version.tags["run_id"] == by_val
    assert float(version.tags["test_accuracy"]) == pytest.approx(decision.test_accuracy)
    assert production_stages() == [version.version]
    with pytest.raises(CifarError, match="never on the test split"):
        registry.find_best_run(metric="test_accuracy")


def test_chooses_among_linked_models_and_ignores_the_old_metric_layout(store, trained_proto):
    """Linked models are ranked by search_logged_models; a run of the layout before 2026-12-02 is no candidate."""
    linked = make_run("a", val=0.8, test=0.5, proto_meta=trained_proto)
    make_run("a", val=0.85, test=0.9, proto_meta=trained_proto, layout="old")  # higher, but no longer read
    chosen = registry.find_best_run()
    assert (chosen.run_id, chosen.metric, chosen.value) == (linked, "val/best_accuracy", 0.8)
    assert chosen.run_test_accuracy == 0.5
    decision = promote()
    description = mlflow.MlflowClient().get_registered_model(NAME).description
    assert decision.promote and production_run() == linked
    assert "uint8, N x 32 x 32 x 3" in description and "`in_distribution`" in description and "airplane" in description


def test_production_model_loads_and_predicts_real_images(store, trained_proto, prepared_dir):
    make_run("a", val=0.9, test=0.2, proto_meta=trained_proto)
    decision = promote()
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    data = load_cache(prepared_dir)
    out = model.predict({"image": np.asarray(data.images["test"])})  # uint8 images, as PIL gives them
    accuracy = float((out["logits"].argmax(1) == data.labels["test"]).mean())
    assert list(out["label"]) == [data.classes[i] for i in out["logits"].argmax(1)]
    assert accuracy > 0.2 and accuracy == pytest.approx(decision.test_accuracy)
    legacy = mlflow.pyfunc.load_model(f"models:/{NAME}/Production").predict({"image": data.images["test"][:50]})
    assert list(legacy["label"]) == list(out["label"][:50])  # the legacy stage serves the same version


def test_worse_challenger_is_refused_then_forced_then_rolled_back(store, trained_proto):
    champion = make_run("a", val=0.8, test=0.5, proto_meta=trained_proto)
    promote()
    challenger = make_run("b", val=0.7, test=0.9, proto_meta=trained_proto)
    decision = promote(experiments=["b"])
    assert not decision.promote and "does not beat" in decision.reason
    assert production_run() == champion
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")) == 2  # registered as challenger

    better = make_run("c", val=0.805, test=0.5, proto_meta=trained_proto)
    assert not promote(experiments=["c"], min_improvement=0.01).promote  # within the margin

    forced = promote(experiments=["b"], force=True)
    assert forced.promote and production_run() == challenger
    assert mlflow.MlflowClient().get_model_version_by_alias(NAME, "previous").run_id == champion
    assert len(production_stages()) == 1

    registry.rollback(NAME)
    assert production_run() == champion
    assert mlflow.MlflowClient().get_model_version_by_alias(NAME, "previous").run_id == challenger
    assert production_stages() == [registry.production_version(NAME).version]
    (within_margin,) = mlflow.MlflowClient().search_model_versions(f"name='{NAME}' and run_id='{better}'")
    assert within_margin.tags["promotion"] == "lost" and within_margin.current_stage == "None"


def test_a_tie_is_not_an_improvement_whatever_the_float_noise(store, trained_proto):
    champion = make_run("a", val=0.23, test=0.5, proto_meta=trained_proto)
    promote()
    tie = float(np.float32(0.23))  # 0.23000000417..., as a float32 mean of 23/100 comes out
    make_run("b", val=tie, test=0.9, proto_meta=trained_proto)
    decision = promote(experiments=["b"])
    assert not decision.promote and "does not beat" in decision.reason
    assert production_run() == champion


def test_rollback_without_previous_is_clear(store, trained_proto):
    make_run("a", val=0.8, test=0.5, proto_meta=trained_proto)
    promote()
    with pytest.raises(CifarError, match="nothing to roll back to"):
        registry.rollback(NAME)


def test_cli_no_eligible_run_writes_nothing(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = run_cli([str(ROOT / "register.py")], env=env, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no finished run with a logged model" in result.stderr and "python train.py" in result.stderr
    assert not mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_registered_models()


def test_cli_dry_run_and_list(store, trained_proto, prepared_dir, tmp_path):
    make_run("a", val=0.9, test=0.2, proto_meta=trained_proto)
    env = {"MLFLOW_TRACKING_URI": store, "CIFAR_DATA": str(prepared_dir)}
    result = run_cli([str(ROOT / "register.py"), "--dry-run"], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Decision: PROMOTE" in result.stdout and "Dry run: nothing changed." in result.stdout
    assert not mlflow.MlflowClient().search_registered_models()
    assert run_cli([str(ROOT / "register.py")], env=env, cwd=tmp_path).returncode == 0
    listed = run_cli([str(ROOT / "register.py"), "--list"], env=env, cwd=tmp_path)
    assert "production" in listed.stdout and "Production" in listed.stdout and "0.900000" in listed.stdout


def test_import_bundled_says_when_the_app_would_not_serve_your_run(store, trained_proto, tmp_path):
    env = {"MLFLOW_TRACKING_URI": store}
    alone = run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=tmp_path)
    assert "now production" in alone.stdout and "not a run you trained" not in alone.stdout
    make_run("a", val=0.5, test=0.5, proto_meta=trained_proto)  # then the user trains (make run)...
    again = run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=tmp_path)  # ...and make app
    assert "production stays version 1" in again.stdout
    assert "The app serves the bundled model, not a run you trained: promote yours with python register.py" in (
        again.stdout
    )


def test_a_registry_from_before_the_promotion_tags_keeps_its_aliases(store, trained_proto):
    """Versions that older register.py left with aliases but no ``promotion`` tag keep their places."""
    client = mlflow.MlflowClient()
    client.create_registered_model(NAME)
    for experiment, val in (("a", 0.8), ("b", 0.9)):
        run_id = make_run(experiment, val=val, test=0.5, proto_meta=trained_proto)
        uri = mlflow.get_run(run_id).data.tags["model_uri"]
        client.create_model_version(NAME, uri, run_id=run_id, tags={"run_id": run_id, "val_accuracy": f"{val:.6f}"})
    client.set_registered_model_alias(NAME, "production", "2")
    client.set_registered_model_alias(NAME, "previous", "1")
    make_run("c", val=0.7, test=0.5, proto_meta=trained_proto)
    assert not promote(experiments=["c"]).promote
    aliased = registry.production_version(NAME), client.get_model_version_by_alias(NAME, "previous")
    assert [str(v.version) for v in aliased] == ["2", "1"]
    assert [str(v) for v in production_stages()] == ["2"]
    registry.rollback(NAME)
    assert str(registry.production_version(NAME).version) == "1"

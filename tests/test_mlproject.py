"""``mlflow run . --env-manager local`` end to end: entry points main, prepare, tune and register."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, clean_env

from cifar.data import load_cache
from cifar.data.sources import read_imagefolder

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mlflow_run(tmp_path: Path, experiment: str, *args: str, env: dict | None = None) -> mlflow.MlflowClient:
    """Run an entry point into a private store (artifacts in tmp_path); return a client of that store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:  # artifacts go to tmp, not the repository's mlruns/
        client.create_experiment(experiment, artifact_location=str(tmp_path / "artifacts" / experiment))
    full_env = clean_env(
        {
            "MLFLOW_TRACKING_URI": uri,
            # mlflow run starts whatever `python` is first on PATH: this environment's.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            **(env or {}),
        }
    )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    result = subprocess.run([*command, *args], env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return client


def params(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("-P", p)]


def test_mlflow_run_trains_into_the_run_it_created(tmp_path, mini_dir):
    env = {"CIFAR_DATA": str(tmp_path / "data"), "CIFAR_SOURCE": str(mini_dir)}
    client = mlflow_run(
        tmp_path,
        "mlproject-test",
        *params("experiment=smoke", "epochs=3", "set=data.subset=300 optim.lr=0.04"),
        env=env,
    )
    runs = client.search_runs([client.get_experiment_by_name("mlproject-test").experiment_id])
    assert len(runs) == 1, "the script must log into the run that mlflow run created, not a second one"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["experiment"] == "smoke"  # logged by mlflow run (-P)
    assert run.data.params["optim.lr"] == "0.04" and run.data.params["data.subset"] == "300"  # by train.py
    assert run.data.params["data.train_size"] == "300"
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [1, 2, 3]

    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)
    raw = read_imagefolder(mini_dir, workers=1)
    logits = model.predict({"image": raw.test_images})["logits"]
    assert float((logits.argmax(1) == raw.test_labels).mean()) > 0.15  # chance is 0.1
    assert (tmp_path / "data" / "cache" / "manifest.json").is_file()  # train.py prepared the data itself


def test_mlflow_run_prepare_entry_point(tmp_path, mini_dir):
    mlflow_run(
        tmp_path,
        "prep",
        "-e",
        "prepare",
        *params(f"source={mini_dir}", f"data_dir={tmp_path / 'prepared'}", "val_size=60"),
    )
    assert load_cache(tmp_path / "prepared").sizes() == {"train": 440, "val": 60, "test": 200}


def test_mlflow_run_tune_then_register(tmp_path, prepared_dir):
    """`mlflow run . -e tune` searches (its run is the study's parent), `-e register` promotes."""
    env = {"CIFAR_DATA": str(prepared_dir)}
    client = mlflow_run(
        tmp_path,
        "tuning",
        "-e",
        "tune",
        *params("experiment=smoke", "space=cpu", "n_trials=2", "epochs_per_trial=1", "study_name=mlp"),
        env=env,
    )
    runs = client.search_runs([client.get_experiment_by_name("tuning").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.data.tags["optuna_study"] == "mlp"
    assert (tmp_path / "optuna.db").is_file()  # beside mlflow.db
    mlflow_run(tmp_path, "tuning", "-e", "register", *params("study_name=mlp"), env=env)
    production = client.get_model_version_by_alias("cifar10-classifier", "production")
    assert production.run_id in {c.info.run_id for c in children}
    # the same run as int8: registered beside production, promoted only if int8 scores higher on validation
    mlflow_run(tmp_path, "tuning", "-e", "register_int8", *params("study_name=mlp", "max_int8_drop=1"), env=env)
    versions = client.search_model_versions("name='cifar10-classifier'")
    int8 = [v for v in versions if v.tags.get("precision") == "int8"]
    assert len(versions) == 2 and len(int8) == 1 and int8[0].run_id == production.run_id
    drop = client.get_run(production.run_id).data.metrics["int8/val_accuracy_drop"]
    now = client.get_model_version_by_alias("cifar10-classifier", "production").version
    assert now == (int8[0].version if drop < 0 else production.version)


def test_mlflow_run_torchrun_entry_point(tmp_path, prepared_dir):
    client = mlflow_run(
        tmp_path,
        "mlproject-ddp",
        "-e",
        "torchrun",
        *params("nproc=2", "experiment=smoke", "epochs=2", "device=cpu", "set=train.batch_size=64"),  # gloo
        env={"CIFAR_DATA": str(prepared_dir), "CIFAR_OUTBOX": str(tmp_path / "outbox")},
    )
    (run,) = client.search_runs([client.get_experiment_by_name("mlproject-ddp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.entryPoint"] == "torchrun"
    assert run.data.tags["world_size"] == "2", "rank 0 logged into the run mlflow run created"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [1, 2]
    assert run.data.tags["model_uri"].startswith("models:/")

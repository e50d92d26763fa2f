"""``mlflow run . --env-manager local`` end to end: one run, joined by the script, into a temp store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mlflow_run(tmp_path: Path, mini_dir: Path, *params: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "CIFAR_DATA": str(tmp_path / "data"),
        "CIFAR_SOURCE": str(mini_dir),
        # mlflow run starts whatever `python` is first on PATH: this environment's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "--env-manager",
        "local",
        "--experiment-name",
        "mlproject-test",
        *[a for p in params for a in ("-P", p)],
    ]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_mlflow_run_trains_into_the_run_it_created(tmp_path, mini_dir):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    # Artifacts go to the temp folder, not the repository's ./mlruns.
    client.create_experiment("mlproject-test", artifact_location=str(tmp_path / "artifacts"))
    result = mlflow_run(tmp_path, mini_dir, "experiment=smoke", "epochs=3", "set=data.subset=300 optim.lr=0.04")
    assert result.returncode == 0, result.stderr[-4000:]

    runs = client.search_runs([client.get_experiment_by_name("mlproject-test").experiment_id])
    assert len(runs) == 1, "the script must log into the run that mlflow run created, not a second one"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["experiment"] == "smoke"  # logged by mlflow run (-P)
    assert run.data.params["optim.lr"] == "0.04" and run.data.params["data.subset"] == "300"  # by train.py
    assert run.data.params["data.train_size"] == "300"
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    from cifar.data.sources import read_imagefolder

    raw = read_imagefolder(mini_dir, workers=1)
    logits = model.predict({"image": raw.test_images.transpose(0, 3, 1, 2).astype(np.float32) / 255})["logits"]
    assert float((logits.argmax(1) == raw.test_labels).mean()) > 0.15  # chance is 0.1
    assert (tmp_path / "data" / "cache" / "manifest.json").is_file()  # train.py prepared the data itself


def test_mlflow_run_prepare_entry_point(tmp_path, mini_dir):
    env_args = [
        "-e",
        "prepare",
        "-P",
        f"source={mini_dir}",
        "-P",
        f"data_dir={tmp_path / 'prepared'}",
        "-P",
        "val_size=60",
    ]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    import mlflow

    mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment("prep", artifact_location=str(tmp_path / "a"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(ROOT),
            "--env-manager",
            "local",
            "--experiment-name",
            "prep",
            *env_args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from cifar.data import load_cache

    assert load_cache(tmp_path / "prepared").sizes() == {"train": 440, "val": 60, "test": 200}


def test_mlflow_run_tune_then_register(tmp_path, prepared_dir):
    """`mlflow run . -e tune` searches (its run is the study's parent), `-e register` promotes."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "CIFAR_DATA": str(prepared_dir),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    client = mlflow.MlflowClient(uri)
    client.create_experiment("tuning", artifact_location=str(tmp_path / "artifacts"))

    def run(*args: str) -> None:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlflow",
                "run",
                str(ROOT),
                "--env-manager",
                "local",
                "--experiment-name",
                "tuning",
                *args,
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]

    run(
        "-e",
        "tune",
        "-P",
        "experiment=smoke",
        "-P",
        "space=cpu",
        "-P",
        "n_trials=2",
        "-P",
        "epochs_per_trial=1",
        "-P",
        "study_name=mlp",
    )
    runs = client.search_runs([client.get_experiment_by_name("tuning").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.data.tags["optuna_study"] == "mlp"
    assert (tmp_path / "optuna.db").is_file()  # beside mlflow.db
    run("-e", "register", "-P", "study_name=mlp")
    production = client.get_model_version_by_alias("cifar10-classifier", "production")
    assert production.run_id in {c.info.run_id for c in children}

"""The embedded SQLite store under concurrency: several training processes logging at once."""

from __future__ import annotations

import subprocess

import mlflow
import pytest
from conftest import PYTHON, ROOT, clean_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_four_processes_log_runs_into_one_sqlite_store_at_once(tmp_path, prepared_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = clean_env({"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, "CIFAR_DATA": str(prepared_dir),
                     "OMP_NUM_THREADS": "1"})  # fmt: skip
    processes = [
        subprocess.Popen(
            [
                PYTHON,
                str(ROOT / "train.py"),
                "--experiment",
                "smoke",
                "--epochs",
                "2",
                "--seed",
                str(i),
                "--run-name",
                f"parallel-{i}",
                "--no-progress",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert "database is locked" not in out + err
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == [f"parallel-{i}" for i in range(4)]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["model_uri"].startswith("models:/")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [1, 2]
    assert not list((tmp_path / "mlflow-outbox").glob("*")), "every run fully uploaded"

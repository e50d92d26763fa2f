"""cifar.assess.compare: a table of what differs between real training runs, their curves, logged as a run."""

from __future__ import annotations

import mlflow
import pytest
from conftest import ROOT, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_compare_two_training_runs(tmp_path, prepared_dir):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CIFAR_DATA": str(prepared_dir)}
    for lr in ("0.05", "0.01"):
        result = run_cli(
            [str(ROOT / "train.py"), "--experiment", "smoke", "--epochs", "2", "--lr", lr, "--no-progress"],
            env=env,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    result = run_cli(["-m", "cifar.assess.compare", "--experiment", "smoke", "--out", str(out)], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    header = result.stdout.splitlines()[0].split()
    assert "optim.lr" in header and "val_accuracy" in header and "test_accuracy" in header
    assert "optim.momentum" not in header  # equal in both runs: not a difference
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    best = max(runs, key=lambda r: r.data.metrics["val/best_accuracy"])
    first_row = result.stdout.splitlines()[1]
    assert first_row.startswith(best.info.run_id[:8])  # sorted by validation accuracy
    (logged,) = client.search_runs([client.get_experiment_by_name("comparisons").experiment_id])
    assert set(logged.data.tags["compared_runs"].split(",")) == {r.info.run_id for r in runs}
    assert {a.path for a in client.list_artifacts(logged.info.run_id, "comparison")} >= {
        "comparison/comparison.csv",
        "comparison/learning_curves.png",
    }
    assert (out / "learning_curves.png").stat().st_size > 10_000


def test_compare_unknown_run_is_clear(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = run_cli(["-m", "cifar.assess.compare", "0123456789abcdef"], env=env, cwd=tmp_path)
    assert result.returncode == 2 and "no such run(s): 0123456789abcdef" in result.stderr
    assert "Traceback" not in result.stderr

"""Bad input to train.py: one clear message naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import pytest
from conftest import ROOT, run_cli

pytestmark = pytest.mark.integration


def assert_clear_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--experiment", "nope"], ["unknown experiment 'nope'", "cpu"]),
        (["--set", "model.name=vit"], ["unknown model 'vit'", "fastnet"]),
        (["--set", "optim.lrr=0.1"], ["unknown field 'optim.lrr'"]),
        (["--set", "train.epochs=ten"], ["'train.epochs' must be int"]),
        (["--config", "missing.yaml"], ["config file 'missing.yaml' does not exist"]),
        (["--device", "tpu"], ["unknown device 'tpu'"]),
    ],
)
def test_bad_arguments(tmp_path, prepared_dir, args, fragments):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CIFAR_DATA": str(prepared_dir)}
    assert_clear_error(run_cli([str(ROOT / "train.py"), *args, "--no-progress"], env=env, cwd=tmp_path), *fragments)


def test_missing_data_with_a_bad_source(tmp_path):
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "CIFAR_DATA": str(tmp_path / "data"),
        "CIFAR_SOURCE": str(tmp_path / "no-such-archive.tar.gz"),
    }
    result = run_cli([str(ROOT / "train.py"), "--experiment", "smoke"], env=env, cwd=tmp_path)
    assert_clear_error(result, "no-such-archive.tar.gz", "does not exist")

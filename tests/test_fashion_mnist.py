"""The lifecycle on a second dataset: Fashion-MNIST from Debian's package, prepared, trained, searched,
registered as its own model and served by ``mlflow models serve`` with its own labels."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from conftest import ROOT, run_cli
from test_serving_rest import answers, serving

from cifar.data import load_cache, prepare_cache
from cifar.data.fashion_mnist import FASHION_MNIST_CLASSES

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SHORT = ["--experiment", "smoke", "--subset", "2000", "--device", "cpu"]


def test_fashion_mnist_is_prepared_trained_tuned_registered_and_served(tmp_path, mini_dir):
    data_dir = tmp_path / "data"
    prepare_cache(str(mini_dir), data_dir, val_size=100, workers=1)  # CIFAR-10: the other real dataset
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CIFAR_DATA": str(data_dir),
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}  # fmt: skip
    steps = {
        "prepare": ["-m", "cifar.data", "prepare", "--source", "fashion-mnist", "--dataset", "fashion-mnist"],
        # the default recipe's net (whitening stem) at a quarter width: it must export grayscale too
        "train": [str(ROOT / "train.py"), *SHORT[2:], "--experiment", "cpu", "--set", "model.width=0.25", "--epochs",
                  "2", "--dataset", "fashion-mnist", "--no-progress"],
        "tune": [str(ROOT / "tune.py"), *SHORT, "--space", "cpu", "--n-trials", "2", "--epochs-per-trial", "1",
                 "--study-name", "fm", "--dataset", "fashion-mnist"],
        "register": [str(ROOT / "register.py"), "--dataset", "fashion-mnist", "--robustness-images", "0"],
    }  # fmt: skip
    for step, args in steps.items():
        result = run_cli(args, env=env, cwd=tmp_path)
        assert result.returncode == 0, f"{step}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    assert "fashion-mnist-classifier version 1: production" in result.stdout

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    production = client.get_model_version_by_alias("fashion-mnist-classifier", "production")
    run = client.get_run(production.run_id)
    assert run.data.tags["dataset"] == "fashion-mnist" and "ood/auroc_cifar10" in run.data.metrics
    assert "ood/auroc_fashion_mnist" not in run.data.metrics  # its own data is not out-of-distribution
    with pytest.raises(mlflow.exceptions.MlflowException):  # CIFAR-10's model was never made
        client.get_registered_model("cifar10-classifier")

    data = load_cache(data_dir / "fashion-mnist")
    sneakers = np.asarray(data.images["test"][data.labels["test"] == 7][:20])
    with serving(env, tmp_path, "fashion", model="models:/fashion-mnist-classifier@production") as url:
        labels = answers(url, sneakers)["label"]
    assert set(labels) <= set(FASHION_MNIST_CLASSES)
    assert labels.count("Sneaker") >= 12, labels  # 20 test sneakers, a 2-epoch model on 2,000 images

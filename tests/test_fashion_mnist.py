"""The lifecycle on a second dataset: Fashion-MNIST from Debian's package, prepared, trained, searched,
registered as its own model, served by ``mlflow models serve`` with its own labels, and by the app in Chromium."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from conftest import BROWSER_TEST, CHROMIUM, CHROMIUM_FLAGS, ROOT, clean_env, keep_screenshot, run_cli
from PIL import Image
from servers import answers, mlflow_models_serve, streamlit_app

from cifar.data import load_cache, prepare_cache
from cifar.data.fashion_mnist import FASHION_MNIST_CLASSES

pytestmark = BROWSER_TEST
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
    with mlflow_models_serve(env, tmp_path, "fashion", model="models:/fashion-mnist-classifier@production") as url:
        labels = answers(url, sneakers)["label"]
    assert set(labels) <= set(FASHION_MNIST_CLASSES)
    assert labels.count("Sneaker") >= 12, labels  # 20 test sneakers, a 2-epoch model on 2,000 images
    upload = tmp_path / "my_sneaker.png"
    Image.fromarray(sneakers[labels.index("Sneaker")]).resize((200, 200), Image.Resampling.BICUBIC).save(upload)
    app_page(clean_env({**env, "PYTHONPATH": str(ROOT)}), tmp_path, upload)


def app_page(env: dict, tmp_path, upload) -> None:
    """The app serves the one model in production, Fashion-MNIST's: its title, classes, gallery and answers."""
    from playwright.sync_api import expect, sync_playwright

    with streamlit_app(env, tmp_path) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            expect.set_options(timeout=60_000)  # the page draws in stages (model, then gallery): slow when loaded
            expect(page.get_by_role("heading", name="Fashion-MNIST classifier")).to_be_visible()
            expect(page.get_by_text(" · ".join(FASHION_MNIST_CLASSES))).to_be_visible()
            expect(page.get_by_text("fashion-mnist-classifier version 1")).to_be_visible()
            expect(page.get_by_role("button", name="Ankle boot").first).to_be_visible()  # its run's gallery
            page.locator('input[type="file"]').first.set_input_files(str(upload), timeout=60_000)
            expect(page.get_by_text("my_sneaker.png").first).to_be_visible(timeout=60_000)
            expect(page.locator("h3").filter(has_text="Sneaker").first).to_be_visible(timeout=60_000)
            expect(page.locator('[data-testid*="VegaLiteChart"]').first).to_be_visible(timeout=30_000)
            page.wait_for_timeout(1500)  # let the chart finish drawing before the picture
            shot = tmp_path / "app_fashion_mnist.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    keep_screenshot(shot)

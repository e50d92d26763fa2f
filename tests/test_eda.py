"""EDA: numbers checked against independent computations; planted duplicates are found."""

from __future__ import annotations

import io
import shutil

import mlflow
import numpy as np
import pytest
from PIL import Image

from cifar.data import load_cache, prepare_cache
from cifar.data.eda import class_balance, find_duplicates, image_statistics, run_eda


@pytest.fixture(scope="module")
def planted(tmp_path_factory, mini_dir):
    """The fixture with one train image copied into test (exact) and one re-encoded into test (near)."""
    root = tmp_path_factory.mktemp("planted")
    tree = shutil.copytree(mini_dir, root / "tree")
    shutil.copy(tree / "train" / "cat" / "0007.jpg", tree / "test" / "cat" / "9000.jpg")
    pixels = np.asarray(Image.open(tree / "train" / "ship" / "0004.jpg").convert("RGB"), np.int16)
    noisy = np.clip(pixels + np.random.default_rng(0).integers(-4, 5, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG")
    (tree / "test" / "ship" / "9001.png").write_bytes(buf.getvalue())
    prepare_cache(str(tree), root / "data", val_size=50, seed=0, workers=1)
    return root / "data"


def test_class_balance_and_channel_stats(planted):
    data = load_cache(planted)
    balance = class_balance(data)
    for split in ("train", "val", "test"):
        counted = np.bincount(data.labels[split], minlength=10)
        table = balance[balance.split == split].set_index("class")["images"]
        assert table.tolist() == counted.tolist()
    assert balance[balance.split == "test"]["images"].sum() == 202
    pixels = np.asarray(data.images["train"], np.float64).reshape(-1, 3) / 255
    assert np.allclose(data.mean, pixels.mean(0), atol=1e-6) and np.allclose(data.std, pixels.std(0), atol=1e-6)


def test_image_statistics(planted):
    data = load_cache(planted)
    stats = image_statistics(data)
    assert len(stats) == sum(data.sizes().values())
    first = np.asarray(data.images["train"][0], np.float64)
    grey = first @ [0.299, 0.587, 0.114]
    row = stats[(stats.split == "train") & (stats["index"] == 0)].iloc[0]
    assert row.brightness == pytest.approx(grey.mean(), rel=1e-4) and row.contrast == pytest.approx(
        grey.std(), rel=1e-3
    )
    assert row.label == data.classes[data.labels["train"][0]]


def test_planted_duplicates_are_found(planted):
    data = load_cache(planted)
    found = find_duplicates(data)
    test, train = np.asarray(data.images["test"]), {s: np.asarray(data.images[s]) for s in ("train", "val")}
    assert len(found.exact) == 1
    row = found.exact.iloc[0]
    assert np.array_equal(test[row.test_index], train[row.train_split][row.train_index])
    assert len(found.near) >= 1
    near = found.near.iloc[0]
    assert 0 < near.mean_abs_diff <= 12
    assert data.classes[data.labels["test"][near.test_index]] == "ship"


@pytest.mark.integration
def test_eda_run_logs_everything(tracking_env, planted):
    run_id = run_eda(planted)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.metrics["duplicates_exact"] == 1 and run.data.metrics["duplicates_near"] >= 1
    assert run.data.metrics["mean_r"] == pytest.approx(load_cache(planted).mean[0])
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "eda")}
    for name in (
        "class_balance.png",
        "class_balance.csv",
        "colour_histograms.png",
        "image_statistics.png",
        "image_statistics.csv.gz",
        "samples.png",
        "augmentation.png",
        "duplicates.png",
        "report.html",
    ):
        assert f"eda/{name}" in files, name
    report = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eda/report.html")
    html = open(report).read()
    assert "1 exact" in html and html.count("data:image/png;base64,") == 6

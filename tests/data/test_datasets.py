"""Any labelled image folder, and Fashion-MNIST from Debian's package, prepared as a dataset of its own.

Real files through the real command: class names with spaces and non-ASCII letters, images of mixed
sizes and modes, no test split given; then the folders that must be refused, each with one message
and no cache left behind.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image

from cifar.data import load_cache, prepare_cache
from cifar.errors import CifarError
from cifar.settings import load_settings, settings

COLOURS = {"red square": (220, 30, 30), "Über blau": (30, 40, 220), "ñandú": (40, 200, 60)}
SIZES = [(20, 50), (300, 200), (64, 64), (45, 33), (128, 96)]


def write_image(path: Path, colour, size, mode: str, seed: int) -> None:
    """A noisy patch of ``colour`` in ``mode`` (L, RGBA, P or RGB), saved in the format its suffix names."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "P":
        image = image.quantize(64)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    """train/<class>/ only: each class its colour, in four modes and five sizes, PNG and JPEG."""
    for c, (name, n) in enumerate(counts.items()):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(n):
            mode = ("RGB", "L", "RGBA", "P")[i % 4]
            suffix = ".jpg" if mode in ("RGB", "L") else ".png"
            write_image(folder / f"{i:03d}{suffix}", COLOURS[name], SIZES[i % len(SIZES)], mode, 100 * c + i)
    return root


@pytest.mark.integration
def test_any_image_folder_is_prepared_trained_and_answers_by_class_name(tmp_path):
    tree = make_tree(tmp_path / "photos", {"red square": 40, "Über blau": 40, "ñandú": 14})
    data_dir = tmp_path / "data"
    prepared = run_cli(
        ["-m", "cifar.data", "prepare", "--source", str(tree), "--dataset", "my-photos", "--data-dir", str(data_dir),
         "--val-size", "15"]  # fmt: skip
    )
    assert prepared.returncode == 0, prepared.stderr
    assert "of 3 classes" in prepared.stdout
    assert "warning: few training images in ñandú" in prepared.stderr  # 14 images, fewer once split
    assert not (data_dir / "cache").exists(), "CIFAR-10's folder stays untouched"
    data = load_cache(data_dir / "my-photos")
    manifest = data.manifest
    assert data.classes == ("red square", "Über blau", "ñandú")  # sorted by name
    assert manifest["dataset"] == "my-photos" and manifest["image_size"] == [32, 32, 3]
    assert manifest["test_split"].startswith("carved: 16 of the source's training images (stratified")
    assert data.sizes() == {"train": 63, "val": 15, "test": 16}
    assert np.bincount(data.labels["test"]).tolist() == [7, 7, 2]
    for label, name in enumerate(data.classes):  # each label holds its class's colour: labelled by name
        mean = np.asarray(data.images["train"][data.labels["train"] == label], float).mean(axis=(0, 1, 2))
        assert np.argmax(mean) == np.argmax(COLOURS[name]), (name, mean)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "CIFAR_DATA": str(data_dir)}
    trained = run_cli(
        [str(ROOT / "train.py"), "--experiment", "smoke", "--epochs", "3", "--batch-size", "16", "--device", "cpu",
         "--dataset", "my-photos", "--mlflow-experiment", "photos", "--no-progress"],
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("photos").experiment_id])
    assert run.data.tags["dataset"] == "my-photos"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"my-photos-train", "my-photos-val", "my-photos-test"}

    cifar10 = run_cli([str(ROOT / "register.py"), "--robustness-images", "0"], env=env, cwd=tmp_path)
    assert cifar10.returncode == 2 and "no finished run" in cifar10.stderr, "another dataset's run is no CIFAR-10 model"
    registered = run_cli(
        [str(ROOT / "register.py"), "--dataset", "my-photos", "--robustness-images", "0"], env=env, cwd=tmp_path
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr[-3000:]
    assert "my-photos-classifier version 1: production" in registered.stdout

    image = tmp_path / "blue.png"
    write_image(image, COLOURS["Über blau"], (90, 60), "RGB", 7)
    predict = ["-m", "cifar", "predict", str(image), "--dataset", "my-photos", "--json"]
    predicted = run_cli(predict, env=env, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    (answer,) = json.loads(predicted.stdout)
    assert answer["model"].startswith("models:/my-photos-classifier@production")
    assert {entry["label"] for entry in answer["top_k"]} <= set(COLOURS)
    assert answer["top_k"][0]["label"] == "Über blau"


def _one_class(root: Path) -> None:
    make_tree(root, {"red square": 6})


def _empty_class(root: Path) -> None:
    make_tree(root, {"red square": 6, "Über blau": 6})
    (root / "train" / "ñandú").mkdir()


def _not_an_image(root: Path) -> None:
    make_tree(root, {"red square": 6, "Über blau": 6})
    (root / "train" / "Über blau" / "notes.jpg").write_text("shopping list: milk, eggs")


def _other_test_classes(root: Path) -> None:
    make_tree(root, {"red square": 6, "Über blau": 6})
    make_tree(root / "t", {"red square": 2, "ñandú": 2})
    (root / "t" / "train").rename(root / "test")


def _huge_image(root: Path) -> None:
    make_tree(root, {"red square": 6, "Über blau": 6})
    Image.new("1", (10_000, 10_000)).save(root / "train" / "red square" / "huge.png")  # 100 megapixels


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_one_class, "train/ holds 1 class folder(s) (red square); a classifier needs 2 to 1,000"),
        (_empty_class, "train/ñandú/ holds no images; add some or remove it"),
        (_not_an_image, "1 unreadable image(s)"),
        (_other_test_classes, "test/ must hold the same class folders as train/; missing Über blau; unexpected ñandú"),
        (_huge_image, "image is too large (10000x10000 = 100,000,000 pixels)"),
    ],
    ids=["one-class", "empty-class", "not-an-image", "other-test-classes", "100-megapixels"],
)
def test_a_bad_folder_gets_one_message_and_no_cache(tmp_path, build, message):
    build(tmp_path / "tree")
    result = run_cli(
        ["-m", "cifar.data", "prepare", "--source", str(tmp_path / "tree"), "--dataset", "bad", "--data-dir",
         str(tmp_path / "data"), "--workers", "1"]  # fmt: skip
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "data" / "bad" / "cache").exists()


def test_a_dataset_name_is_checked_before_anything_is_read(tmp_path):
    with pytest.raises(CifarError, match="--dataset 'My Photos': use lower-case letters"):
        prepare_cache(str(tmp_path / "nowhere"), tmp_path, dataset="My Photos")


@pytest.mark.slow
def test_fashion_mnist_is_prepared_from_the_debian_package(tmp_path):
    data = prepare_cache("fashion-mnist", tmp_path, dataset="fashion-mnist")
    assert data.manifest["cache_dir"] == str(tmp_path / "fashion-mnist" / "cache")
    assert data.classes[7] == "Sneaker" and len(data.classes) == 10
    assert data.sizes() == {"train": 55_000, "val": 5_000, "test": 10_000}
    assert data.manifest["test_split"] == "the source's" and data.manifest["source_format"] == "fashion-mnist-idx"
    assert data.images["test"].shape == (10_000, 32, 32, 3)
    first = data.images["test"][0]  # t10k's first image is an ankle boot, grey on black
    assert data.labels["test"][0] == 9 and (first[..., 0] == first[..., 2]).all() and first[0, 0, 0] == 0


def test_fashion_mnist_files_that_do_not_match_their_digest_are_refused(tmp_path, monkeypatch):
    folder = shutil.copytree(settings().fashion_mnist, tmp_path / "fm")
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = bytearray(f.read())
    raw[5000] ^= 0xFF  # one pixel changed
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    monkeypatch.setenv("CIFAR_FASHION_MNIST", str(folder))
    load_settings()  # as a command reads its environment at its start
    with pytest.raises(CifarError, match="train-images-idx3-ubyte.gz: its contents do not match their known digest"):
        prepare_cache("fashion-mnist", tmp_path / "data", dataset="fashion-mnist")
    assert not (tmp_path / "data" / "fashion-mnist" / "cache").exists()
    monkeypatch.delenv("CIFAR_FASHION_MNIST")
    load_settings()

"""Cache round-trip, manifest, stratified split, and the full shared archive when present."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest
from conftest import FIXTURE, SHARED_ARCHIVE, run_cli

from cifar.data import ensure_cache, load_cache, prepare_cache, stratified_split
from cifar.data.cache import channel_stats
from cifar.errors import CifarError


def test_cache_round_trip(prepared_dir, mini_raw):
    data = load_cache(prepared_dir)
    assert data.sizes() == {"train": 400, "val": 100, "test": 200}
    # train + val is exactly the source's training split, test is the test split.
    both = np.concatenate([data.images["train"], data.images["val"]])
    assert sorted(map(bytes, both.reshape(500, -1))) == sorted(map(bytes, mini_raw.train_images.reshape(500, -1)))
    assert np.array_equal(np.sort(data.labels["test"]), np.sort(mini_raw.test_labels))
    for split in ("train", "val", "test"):
        assert data.images[split].dtype == np.uint8 and data.labels[split].dtype == np.int64


def test_manifest_digests_match_files(prepared_dir):
    folder = prepared_dir / "cache"
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert manifest["counts"] == {"train": 400, "val": 100, "test": 200}
    assert manifest["class_counts"]["val"] == [10] * 10
    combined = hashlib.sha256("".join(manifest["files"][k] for k in sorted(manifest["files"])).encode()).hexdigest()
    assert manifest["digest"] == combined


def test_mean_std_are_the_training_split_statistics(prepared_dir):
    data = load_cache(prepared_dir)
    pixels = np.asarray(data.images["train"], dtype=np.float64).reshape(-1, 3) / 255
    assert np.allclose(data.mean, pixels.mean(0), atol=1e-6)
    assert np.allclose(data.std, pixels.std(0), atol=1e-6)
    assert channel_stats(np.asarray(data.images["train"])) == (list(data.mean), list(data.std))


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), [500, 400, 300, 500, 500, 500, 500, 500, 500, 500])
    rest, val = stratified_split(labels, 460, seed=3)
    assert len(val) == 460 and len(rest) == len(labels) - 460
    assert not set(rest) & set(val)
    assert set(rest) | set(val) == set(range(len(labels)))
    share = np.bincount(labels[val], minlength=10) / np.bincount(labels, minlength=10)
    assert np.allclose(share, 0.1, atol=0.01)
    assert np.array_equal(stratified_split(labels, 460, seed=3)[1], val)
    assert not np.array_equal(stratified_split(labels, 460, seed=4)[1], val)


def test_bad_val_size():
    with pytest.raises(CifarError, match="--val-size"):
        stratified_split(np.arange(10) % 2, 10, seed=0)


def test_subset_is_stratified_and_keeps_test(prepared_dir):
    data = load_cache(prepared_dir).subset(200, seed=1)
    assert data.sizes() == {"train": 200, "val": 50, "test": 200}
    assert np.bincount(data.labels["train"]).tolist() == [20] * 10


def test_missing_cache_says_how_to_prepare(tmp_path):
    with pytest.raises(CifarError, match="python -m cifar.data prepare"):
        load_cache(tmp_path)


def test_prepare_cli(tmp_path, mini_dir):
    result = run_cli(
        ["-m", "cifar.data", "prepare", "--source", str(mini_dir), "--data-dir", str(tmp_path), "--val-size", "50"]
    )
    assert result.returncode == 0, result.stderr
    assert "Prepared 700 images" in result.stdout
    assert load_cache(tmp_path).sizes() == {"train": 450, "val": 50, "test": 200}


def test_prepare_cli_bad_source_is_one_clear_line(tmp_path):
    result = run_cli(
        ["-m", "cifar.data", "prepare", "--source", str(tmp_path / "missing"), "--data-dir", str(tmp_path)]
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: data source") and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not SHARED_ARCHIVE.exists() and not os.environ.get("CI"),
    reason="needs ../shared/data/cifar10-jpeg.tar.gz (CI has it: there a missing archive fails)",
)
def test_full_shared_archive(tmp_path):
    assert SHARED_ARCHIVE.exists(), f"{SHARED_ARCHIVE} is missing: CI runs with ../shared beside the clone"
    started = time.perf_counter()
    prepare_cache(str(SHARED_ARCHIVE), tmp_path)
    prepare_seconds = time.perf_counter() - started
    started = time.perf_counter()
    data = load_cache(tmp_path)
    arrays = [np.asarray(data.images[s]) for s in ("train", "val", "test")]
    load_seconds = time.perf_counter() - started
    assert data.sizes() == {"train": 45000, "val": 5000, "test": 10000}
    assert data.manifest["class_counts"]["test"] == [1000] * 10
    assert data.manifest["class_counts"]["val"] == [500] * 10
    assert sum(a.nbytes for a in arrays) == 60000 * 32 * 32 * 3
    assert load_seconds < 1.0, f"loading the cache took {load_seconds:.2f} s"
    print(f"prepare {prepare_seconds:.1f} s, load {load_seconds:.3f} s")


def test_train_and_val_are_stored_shuffled(prepared_dir):
    """Sources list images class by class; the cache must not (a 'first N' sample would be one class)."""
    data = load_cache(prepared_dir)
    for split in ("train", "val"):
        first = data.labels[split][: len(data.labels[split]) // 5]
        assert len(np.unique(first)) >= 8, split


@pytest.fixture(scope="module")
def even_cache(tmp_path_factory, mini_dir):
    """The fixture prepared with val and test the same size (200 each), so two splits' files can swap unseen
    by any shape check."""
    data_dir = tmp_path_factory.mktemp("even")
    prepare_cache(str(mini_dir), data_dir, val_size=200, seed=0, workers=1)
    return data_dir / "cache"


def flip_middle(path, size=4096):
    """Invert ``size`` bytes in the middle of a file: what a bad sector or a stray write leaves."""
    raw = bytearray(path.read_bytes())
    start = len(raw) // 2 - size // 2
    raw[start : start + size] = bytes(b ^ 0xFF for b in raw[start : start + size])
    path.write_bytes(bytes(raw))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-3072])  # the last image gone


def swap_val_and_test(path):
    other = path.with_name(path.name.replace("val_", "test_"))
    saved = path.read_bytes()
    path.write_bytes(other.read_bytes())
    other.write_bytes(saved)


@pytest.mark.parametrize(
    ("corrupt", "name", "named"),
    [
        (flip_middle, "train_images.npy", "train_images.npy"),
        (truncate, "val_images.npy", "val_images.npy"),
        (swap_val_and_test, "val_images.npy", "test_images.npy, val_images.npy"),
        (swap_val_and_test, "val_labels.npy", "test_labels.npy, val_labels.npy"),
    ],
)
def test_a_changed_cache_file_stops_the_load_and_says_how_to_rebuild(tmp_path, even_cache, corrupt, name, named):
    folder = tmp_path / "cache"
    shutil.copytree(even_cache, folder)
    assert load_cache(tmp_path).sizes() == {"train": 300, "val": 200, "test": 200}
    corrupt(folder / name)
    with pytest.raises(CifarError) as caught:
        ensure_cache(tmp_path)  # what training calls
    message = str(caught.value)
    assert f"{named} changed since it was prepared" in message
    assert f"python -m cifar.data prepare --source {FIXTURE} --val-size 200 --seed 0 --data-dir {tmp_path}" in message


def test_a_flipped_cache_is_one_error_line_and_the_command_it_gives_rebuilds_it(tmp_path, even_cache):
    shutil.copytree(even_cache, tmp_path / "cache")
    flip_middle(tmp_path / "cache" / "train_images.npy")
    result = run_cli(["-m", "cifar.data", "info", "--data-dir", str(tmp_path)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the cache in") and result.stderr.count("\n") == 1, result.stderr
    command = result.stderr.split("Run again: python ", 1)[1].split()
    assert command[:3] == ["-m", "cifar.data", "prepare"]
    rebuilt = run_cli(command)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert load_cache(tmp_path).digest == json.loads((even_cache / "manifest.json").read_text())["digest"]

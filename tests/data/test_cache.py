"""Cache round-trip, manifest, stratified split, and the full shared archive when present."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
from conftest import SHARED_ARCHIVE, run_cli

from cifar.data import load_cache, prepare_cache, stratified_split
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
@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason="needs ../shared/data/cifar10-jpeg.tar.gz (present in CI)")
def test_full_shared_archive(tmp_path):
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

"""The decoded cache: uint8 arrays per split, a stratified seeded validation split, a manifest.

Decoding happens once (``prepare_cache``); every later run memory-maps plain ``.npy`` files
(``load_cache``), which takes a fraction of a second for all 60,000 images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cifar.data.sources import CIFAR10_CLASSES, RawDataset, load_source
from cifar.errors import CifarError
from cifar.settings import settings

CACHE_FORMAT = 1
SPLITS = ("train", "val", "test")
DEFAULT_VAL_SIZE = 5000
DEFAULT_DATASET = "cifar10"
TEST_SHARE = 1 / 6  # carved out when a source has no test split: CIFAR-10's own 10,000 of 60,000
FEW_IMAGES = 20  # a class with fewer training images than this is named in a warning


def default_data_dir() -> Path:
    return settings().data_dir


def default_source() -> str:
    return settings().source


@dataclass(frozen=True)
class CifarData:
    """Images (N x 32 x 32 x 3 uint8) and labels (int64) for train, val and test."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    classes: tuple[str, ...]
    manifest: dict = field(repr=False)

    @property
    def dataset(self) -> str:
        return self.manifest.get("dataset", DEFAULT_DATASET)

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["std"])

    def sizes(self) -> dict[str, int]:
        return {split: len(self.labels[split]) for split in SPLITS}

    def subset(self, n_train: int, seed: int = 0) -> CifarData:
        """A stratified subset of ``n_train`` training images, with val shrunk in proportion.

        The test split is never reduced: test accuracy always means the whole test split.
        """
        if not n_train or n_train >= len(self.labels["train"]):
            return self
        n_val = max(len(self.classes), round(n_train * len(self.labels["val"]) / len(self.labels["train"])))
        images, labels = dict(self.images), dict(self.labels)
        for split, n in (("train", n_train), ("val", n_val)):
            _, keep = stratified_split(self.labels[split], min(n, len(self.labels[split])), seed)
            images[split], labels[split] = self.images[split][keep], self.labels[split][keep]
        manifest = {**self.manifest, "subset": {"train": n_train, "val": len(labels["val"])}}
        return CifarData(images, labels, self.classes, manifest)


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, val) with class proportions kept; deterministic for a seed."""
    if not 0 < val_size < len(labels):
        raise CifarError(f"--val-size must be between 1 and {len(labels) - 1}, got {val_size}.")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * val_size / len(labels)
    quota = np.floor(exact).astype(int)
    # Largest remainders get the leftover places, so the sizes add up exactly.
    for i in np.argsort(-(exact - quota), kind="stable")[: val_size - quota.sum()]:
        quota[i] += 1
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)])
    val.sort()
    rest = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return rest, val


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units (what training normalizes with).

    Exact, from per-channel histograms of the 256 levels: no float copy of the split (1 GB for
    CIFAR-10's train split, most of the time data preparation once spent here).
    """
    counts = np.zeros((3, 256), dtype=np.float64)
    for start in range(0, len(images), 8192):
        block = np.asarray(images[start : start + 8192]).reshape(-1, 3)
        for channel in range(3):
            counts[channel] += np.bincount(block[:, channel], minlength=256)
    levels = np.arange(256) / 255.0
    total = counts.sum(1)
    mean = counts @ levels / total
    std = np.sqrt((counts * (levels[None, :] - mean[:, None]) ** 2).sum(1) / total)
    return mean.round(6).tolist(), std.round(6).tolist()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "cache"


def dataset_dir(data_dir: Path | None, dataset: str | None) -> Path:
    """A dataset's own data folder: ``data_dir`` itself for CIFAR-10 (as always), else ``data_dir/NAME``."""
    data_dir = Path(data_dir or default_data_dir())
    name = dataset or DEFAULT_DATASET
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise CifarError(f"--dataset {name!r}: use lower-case letters, digits, '.', '_' and '-' (e.g. my-photos).")
    return data_dir if name == DEFAULT_DATASET else data_dir / name


def prepare_cache(
    source: str | None = None,
    data_dir: Path | None = None,
    val_size: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    dataset: str | None = None,
) -> CifarData:
    """Decode ``source`` once into the dataset's ``cache/`` (written to a temp folder, then renamed).

    ``dataset`` (default ``cifar10``, which must hold the CIFAR-10 classes) names the data folder
    (``dataset_dir``). ``val_size`` defaults to 5,000 images, or a tenth of the training images for
    small sources. A source without a test split has one carved out of train (``TEST_SHARE``).
    """
    source = source or default_source()
    dataset = dataset or DEFAULT_DATASET
    data_dir = dataset_dir(data_dir, dataset)
    started = time.perf_counter()
    raw = load_source(source, data_dir, workers, classes=CIFAR10_CLASSES if dataset == DEFAULT_DATASET else None)
    test_split = "the source's"
    if not len(raw.test_labels):
        raw, test_split = carve_test_split(raw, seed)
    if val_size is None:
        val_size = min(DEFAULT_VAL_SIZE, len(raw.train_labels) // 10)
    arrays = split_source(raw, val_size, seed)
    _warn_few_images(arrays["train"][1], raw.classes)
    mean, std = channel_stats(arrays["train"][0])
    with _staging_folder(data_dir) as tmp:
        files = {}
        for split, (images, labels) in arrays.items():
            for kind, array in (("images", images), ("labels", labels)):
                name = f"{split}_{kind}.npy"
                np.save(tmp / name, np.ascontiguousarray(array), allow_pickle=False)
                files[name] = _sha256(tmp / name)
        manifest = {
            "format": CACHE_FORMAT,
            "dataset": dataset,
            "source": source,
            "source_format": raw.source_format,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "classes": list(raw.classes),
            "image_size": [32, 32, 3],  # every source is decoded to this (cifar.contract.images)
            "test_split": test_split,
            "counts": {split: int(len(arrays[split][1])) for split in SPLITS},
            "class_counts": {
                split: np.bincount(arrays[split][1], minlength=len(raw.classes)).tolist() for split in SPLITS
            },
            "val_size": val_size,
            "seed": seed,
            "mean": mean,
            "std": std,
            "files": files,
            "digest": hashlib.sha256("".join(files[k] for k in sorted(files)).encode()).hexdigest(),
            "prepare_seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return load_cache(data_dir)


def carve_test_split(raw: RawDataset, seed: int) -> tuple[RawDataset, str]:
    """A stratified, seeded test split out of the training images, and the manifest's words for it."""
    size = max(len(raw.classes), round(len(raw.train_labels) * TEST_SHARE))
    train_idx, test_idx = stratified_split(raw.train_labels, size, seed + 2)  # not the validation split's draw
    images, labels = raw.train_images, raw.train_labels
    carved = replace(
        raw, train_images=images[train_idx], train_labels=labels[train_idx],
        test_images=images[test_idx], test_labels=labels[test_idx],
    )  # fmt: skip
    return carved, f"carved: {len(test_idx)} of the source's training images (stratified, seed {seed + 2})"


def _warn_few_images(train_labels: np.ndarray, classes: tuple[str, ...]) -> None:
    counts = np.bincount(train_labels, minlength=len(classes))
    few = [f"{classes[i]} ({n})" for i, n in enumerate(counts) if n < FEW_IMAGES]
    if few:
        print(f"warning: few training images in {', '.join(few)}; their figures will be noisy.", file=sys.stderr)


def split_source(raw: RawDataset, val_size: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split -> (images, labels): a stratified validation split of the training images, seeded."""
    train_idx, val_idx = stratified_split(raw.train_labels, val_size, seed)
    # Store train and val in a seeded random order: sources list images class by class, and
    # any "first N images" (a preview, an init sample) must not be a single class.
    rng = np.random.default_rng(seed + 1)
    train_idx, val_idx = rng.permutation(train_idx), rng.permutation(val_idx)
    return {
        "train": (raw.train_images[train_idx], raw.train_labels[train_idx]),
        "val": (raw.train_images[val_idx], raw.train_labels[val_idx]),
        "test": (raw.test_images, raw.test_labels),
    }


@contextlib.contextmanager
def _staging_folder(data_dir: Path) -> Iterator[Path]:
    """A temp folder that becomes ``data_dir/cache`` when the block ends, or vanishes if it fails."""
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".cache-", dir=data_dir))
    except OSError as exc:
        raise CifarError(f"cannot write to data folder {data_dir} ({exc}); choose another with --data-dir.") from None
    try:
        yield tmp
        target = cache_dir(data_dir)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CifarError(f"could not write the cache in {data_dir} ({exc}).") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_cache(data_dir: Path | None = None) -> CifarData:
    """Memory-map the cache, once every file is checked against the SHA-256 the manifest recorded.

    Hashing every byte is cheap beside training, which reads them all anyway (cost: benchmarks/cache_check.py);
    cheaper checks (sizes, mtimes, sampled blocks) miss bytes changed in place.
    """
    folder = cache_dir(Path(data_dir or default_data_dir()))
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CifarError(
            f"no prepared data in {folder}. Run: python -m cifar.data prepare --source cifar10|PATH "
            f"--data-dir {folder.parent}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        _check_files(folder, manifest)
        images, labels = {}, {}
        for split in SPLITS:
            images[split] = np.load(folder / f"{split}_images.npy", mmap_mode="r", allow_pickle=False)
            labels[split] = np.load(folder / f"{split}_labels.npy", allow_pickle=False)
            n = manifest["counts"][split]
            if images[split].shape != (n, 32, 32, 3) or labels[split].shape != (n,):
                raise ValueError(f"{split}: shapes {images[split].shape} and {labels[split].shape}, manifest says {n}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CifarError(f"the cache in {folder} is damaged ({exc}). {_prepare_again(folder, manifest_path)}") from None
    manifest["cache_dir"] = str(folder)
    return CifarData(images, labels, tuple(manifest["classes"]), manifest)


def _check_files(folder: Path, manifest: dict) -> None:
    """Raise ValueError unless each cache file has the SHA-256 written at prepare time."""
    expected = {f"{split}_{kind}.npy" for split in SPLITS for kind in ("images", "labels")}
    if set(manifest["files"]) != expected:
        raise ValueError(f"its manifest lists {sorted(manifest['files'])}, not {sorted(expected)}")
    changed = [name for name, digest in sorted(manifest["files"].items()) if _sha256(folder / name) != digest]
    if changed:
        raise ValueError(f"{', '.join(changed)} changed since it was prepared: SHA-256 differs from manifest.json")


def _prepare_again(folder: Path, manifest_path: Path) -> str:
    """The command that rebuilds this cache: the same source, split size and seed when the manifest says."""
    data_dir = folder.parent
    try:
        m = json.loads(manifest_path.read_text())
        how = f"--source {shlex.quote(m['source'])} --val-size {int(m['val_size'])} --seed {int(m['seed'])}"
        if m.get("dataset", DEFAULT_DATASET) != DEFAULT_DATASET:
            how, data_dir = f"{how} --dataset {shlex.quote(m['dataset'])}", data_dir.parent
    except (OSError, ValueError, KeyError, TypeError):
        how = "--source cifar10|PATH"
    return f"Run again: python -m cifar.data prepare {how} --data-dir {shlex.quote(str(data_dir))}"


def ensure_cache(data_dir: Path | None = None, source: str | None = None, dataset: str | None = None) -> CifarData:
    """Load the dataset's cache; CIFAR-10's is prepared first (from ``source``, $CIFAR_SOURCE or the
    download) if missing. Another dataset must have been prepared: its source is the user's."""
    data_dir = dataset_dir(data_dir, dataset)
    if not (cache_dir(data_dir) / "manifest.json").is_file():
        if (dataset or DEFAULT_DATASET) != DEFAULT_DATASET:
            raise CifarError(
                f"dataset {dataset} is not prepared ({cache_dir(data_dir)} is missing). Run: python -m cifar.data "
                f"prepare --source PATH --dataset {dataset} --data-dir {shlex.quote(str(data_dir.parent))}"
            )
        source = source or default_source()
        print(f"No prepared data in {cache_dir(data_dir)}: preparing it from {source} ...", flush=True)
        return prepare_cache(source, data_dir)
    return load_cache(data_dir)

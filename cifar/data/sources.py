"""Where a dataset comes from: CIFAR-10's canonical download, its archive or folder, Fashion-MNIST's
idx files, or any ImageFolder tree (``train/<class>/*``, optionally ``test/<class>/*``).

Every reader returns a ``RawDataset`` of decoded uint8 arrays, 32 x 32 RGB (``cifar.contract.images``
converts any mode and resizes with bicubic filtering); nothing here writes the cache.
"""

from __future__ import annotations

import collections
import io
import itertools
import os
import pickle
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar.contract.images import decode_image
from cifar.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_split
from cifar.errors import CifarError
from cifar.settings import settings

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_SPLITS = ("train", "test")
MAX_CLASSES = 1000


@dataclass(frozen=True)
class RawDataset:
    train_images: np.ndarray  # N x 32 x 32 x 3 uint8
    train_labels: np.ndarray  # N int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    source_format: str


def load_source(
    source: str, data_dir: Path, workers: int | None = None, classes: tuple[str, ...] | None = CIFAR10_CLASSES
) -> RawDataset:
    """Read ``source``: ``cifar10`` (download), ``fashion-mnist`` (Debian's package) or a path in any
    supported format. An ImageFolder must hold exactly ``classes``; with None, any 2 to 1,000 classes."""
    if source == "cifar10":
        archive = download_cifar10(data_dir)
        return read_canonical_archive(archive)
    if source == "fashion-mnist":
        train, test = (fashion_mnist_split(settings().fashion_mnist, split) for split in ("train", "t10k"))
        return RawDataset(*train, *test, FASHION_MNIST_CLASSES, "fashion-mnist", "fashion-mnist-idx")
    path = Path(source).expanduser()
    if not path.exists():
        raise CifarError(
            f"data source '{source}' does not exist. Pass --source cifar10 to download CIFAR-10, "
            "or a path to cifar-10-python.tar.gz, a cifar-10-batches-py/ folder, "
            "an ImageFolder tree (train/<class>/*, test/<class>/*) or a .tar.gz of one."
        )
    if path.is_dir():
        return _read_directory(path, workers, classes)
    if tarfile.is_tarfile(path):
        names = _tar_names(path)
        if any(Path(name).name == _TRAIN_BATCHES[0] for name in names):
            return read_canonical_archive(path)
        return read_imagefolder_archive(path, workers, classes)
    raise CifarError(f"data source '{source}' is neither a folder nor a .tar/.tar.gz archive.")


# --- the canonical download ----------------------------------------------------------------
def download_cifar10(data_dir: Path, url: str | None = None, md5: str | None = None) -> Path:
    """Download ``cifar-10-python.tar.gz`` into ``data_dir`` and verify its MD5 (torchvision).

    ``$CIFAR10_URL`` / ``$CIFAR10_MD5`` point at a mirror. A file that fails the checksum is
    deleted, never used.
    """
    from torchvision.datasets.utils import check_integrity, download_url  # lazy: the slim app venv has no torchvision

    url = url or settings().cifar10_url or CIFAR10_URL
    md5 = md5 or settings().cifar10_md5 or CIFAR10_MD5
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / CIFAR10_ARCHIVE
    if archive.exists() and check_integrity(str(archive), md5):
        return archive
    try:
        download_url(url, str(data_dir), filename=CIFAR10_ARCHIVE, md5=md5)
    except RuntimeError as exc:
        archive.unlink(missing_ok=True)
        if "corrupted" in str(exc) or "not found" in str(exc).lower():
            raise CifarError(
                f"the download from {url} failed its MD5 checksum (expected {md5}); "
                "the partial file was deleted. Try again, or pass --source PATH to a local copy."
            ) from None
        raise CifarError(f"could not download CIFAR-10 from {url}: {exc}") from None
    except OSError as exc:
        archive.unlink(missing_ok=True)
        raise CifarError(
            f"could not download CIFAR-10 from {url} ({exc}). Without internet access, pass "
            "--source PATH (or set $CIFAR_SOURCE) to a local archive or image folder."
        ) from None
    return archive


# --- canonical python batches ----------------------------------------------------------------
class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the canonical batch files but refuses any global except NumPy's array pieces."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes at protocol 2
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data batch")
        return super().find_class(module, name)


def _parse_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
        pixels = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except Exception as exc:  # any malformed batch gets the same clear message
        raise CifarError(f"'{name}' is not a valid CIFAR-10 python batch ({exc}).") from None
    return np.ascontiguousarray(images), labels


def _assemble_canonical(batches: dict[str, bytes], source: str, fmt: str) -> RawDataset:
    missing = [b for b in (*_TRAIN_BATCHES, _TEST_BATCH) if b not in batches]
    if missing:
        raise CifarError(f"{source} is missing {', '.join(missing)}: it is not a complete CIFAR-10 copy.")
    train = [_parse_batch(batches[b], b) for b in _TRAIN_BATCHES]
    test_images, test_labels = _parse_batch(batches[_TEST_BATCH], _TEST_BATCH)
    classes = CIFAR10_CLASSES
    if "batches.meta" in batches:
        meta = _BatchUnpickler(io.BytesIO(batches["batches.meta"]), encoding="bytes").load()
        classes = tuple(n.decode() for n in meta[b"label_names"])
    return RawDataset(
        np.concatenate([t[0] for t in train]),
        np.concatenate([t[1] for t in train]),
        test_images,
        test_labels,
        classes,
        source,
        fmt,
    )


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Archives are read in memory, never extracted; still, refuse the members tarfile's ``data``
    filter refuses (links, absolute or escaping paths, devices): no honest dataset has them."""
    if member.name.startswith("/") or ".." in Path(member.name).parts:
        raise CifarError(
            f"archive {archive} is refused: member {member.name!r} has an absolute path or one outside the "
            "destination. A dataset archive holds only relative paths."
        )
    if member.issym() or member.islnk():
        raise CifarError(
            f"archive {archive} is refused: it holds a link ({member.name} -> {member.linkname}). "
            "A dataset archive holds only files and folders."
        )
    if member.isfile() or member.isdir():
        return  # relative and link-free: nothing more for the filter to refuse (it costs ~80 us a member)
    try:
        tarfile.data_filter(member, "/nonexistent-destination")
    except tarfile.FilterError as exc:
        raise CifarError(
            f"archive {archive} is refused: {exc}. A dataset archive holds only files and folders."
        ) from None


def read_canonical_archive(path: Path) -> RawDataset:
    wanted = {*_TRAIN_BATCHES, _TEST_BATCH, "batches.meta"}
    batches: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                _check_member(member, path)
                if member.isfile() and Path(member.name).name in wanted:
                    batches[Path(member.name).name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CifarError(f"archive {path} is truncated or corrupt ({exc}). Delete it and download it again.") from None
    return _assemble_canonical(batches, str(path), "cifar10-python-archive")


def read_canonical_folder(folder: Path) -> RawDataset:
    batches = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    return _assemble_canonical(batches, str(folder), "cifar10-python-folder")


# --- ImageFolder trees and archives of them ------------------------------------------------------
def _check_classes(found: dict[str, set[str]], source: str, expected: tuple[str, ...] | None) -> tuple[str, ...]:
    """The dataset's classes in label order: ``expected`` when given (CIFAR-10's canonical order), else
    the train folders' names sorted. Every split present must hold exactly those class folders."""
    train = found.get("train", set())
    if expected is None and not 2 <= len(train) <= MAX_CLASSES:
        raise CifarError(
            f"ImageFolder {source}: train/ holds {len(train)} class folder(s) ({', '.join(sorted(train))}); "
            f"a classifier needs 2 to {MAX_CLASSES:,}."
        )
    classes = expected or tuple(sorted(train))
    for split in _SPLITS:
        if split == "test" and expected is None and split not in found:
            continue  # no test split: the cache carves one out of train
        there = found.get(split, set())
        missing, extra = sorted(set(classes) - there), sorted(there - set(classes))
        if missing or extra:
            parts = [
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(extra)}" if extra else "",
            ]
            wanted = (
                f"exactly the {len(expected)} CIFAR-10 class folders ({', '.join(expected)})"
                if expected
                else "the same class folders as train/"
            )
            raise CifarError(f"ImageFolder {source}: {split}/ must hold {wanted}; {'; '.join(p for p in parts if p)}.")
    return classes


def _classes_by_split(entries: Iterable[tuple]) -> dict[str, set[str]]:
    """{split: class folders seen} of entries that start with (split, class, ...)."""
    found: dict[str, set[str]] = {}
    for split, cls, *_ in entries:
        found.setdefault(split, set()).add(cls)
    return found


def _decode_chunk(items: list[tuple[str, bytes | str]]) -> list[np.ndarray | str]:
    out: list[np.ndarray | str] = []
    for name, data in items:
        try:
            out.append(decode_image(data if isinstance(data, bytes) else Path(data), name))
        except CifarError as exc:
            out.append(str(exc))
    return out


_DECODE_CHUNK = 1024  # images per task: large enough to amortise the hand-off, small enough to overlap


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _decode_all(items: Iterable[tuple[str, bytes | str]], workers: int | None, source: str) -> np.ndarray:
    """Decode images on all cores while the rest still streams in; report every unreadable file at once."""
    workers = workers or os.cpu_count() or 1
    chunks = _chunks(items, _DECODE_CHUNK)
    head = list(itertools.islice(chunks, 2))
    results: list[np.ndarray | str] = []
    if workers > 1 and len(head) > 1:  # a process pool pays off beyond one chunk
        with ProcessPoolExecutor(workers) as pool:
            pending: collections.deque = collections.deque()
            for chunk in itertools.chain(head, chunks):
                pending.append(pool.submit(_decode_chunk, chunk))
                if len(pending) > 4 * workers:  # bounded: a huge archive never sits in memory whole
                    results.extend(pending.popleft().result())
            while pending:
                results.extend(pending.popleft().result())
    else:
        for chunk in itertools.chain(head, chunks):
            results.extend(_decode_chunk(chunk))
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        shown = "\n  ".join(errors[:5])
        raise CifarError(
            f"{len(errors)} unreadable image(s) in {source}:\n  {shown}\nRemove or replace them, then prepare again."
        )
    return np.stack(results) if results else np.zeros((0, 32, 32, 3), np.uint8)


def _to_dataset(
    entries: Iterable[tuple[str, str, str, bytes | str]],
    source: str,
    fmt: str,
    workers: int | None,
    expected: tuple[str, ...] | None = CIFAR10_CLASSES,
) -> RawDataset:
    """entries: (split, class, name, bytes-or-path), decoded as they stream in (an archive is read
    while the first images decode), then labelled and put in class order."""
    keys: list[tuple[str, str, str]] = []

    def payloads() -> Iterator[tuple[str, bytes | str]]:
        for split, cls, name, data in entries:
            keys.append((split, cls, name))
            yield name, data

    images = _decode_all(payloads(), workers, source)
    classes = _check_classes(_classes_by_split(keys), source, expected)
    order = sorted(range(len(keys)), key=lambda i: (keys[i][0], classes.index(keys[i][1]), keys[i][2]))
    images = images[order]
    labels = np.array([classes.index(keys[i][1]) for i in order], dtype=np.int64)
    is_train = np.array([keys[i][0] == "train" for i in order], dtype=bool)
    return RawDataset(images[is_train], labels[is_train], images[~is_train], labels[~is_train], classes, source, fmt)


def _imagefolder_root(path: Path) -> Path | None:
    if (path / "train").is_dir():
        return path
    children = [c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1:
        return _imagefolder_root(children[0])
    return None


def read_imagefolder(
    root: Path, workers: int | None = None, expected: tuple[str, ...] | None = CIFAR10_CLASSES
) -> RawDataset:
    entries = []
    for split in (s for s in _SPLITS if (root / s).is_dir()):
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            files = sorted(f for f in class_dir.iterdir() if f.is_file() and not f.name.startswith("."))
            if not files:
                raise CifarError(
                    f"ImageFolder {root}: {split}/{class_dir.name}/ holds no images; add some or remove it."
                )
            entries += [(split, class_dir.name, str(file.relative_to(root)), str(file)) for file in files]
    _check_classes(_classes_by_split(entries), str(root), expected)  # before any decoding: the listing tells
    return _to_dataset(entries, str(root), "imagefolder", workers, expected)


def _iter_tar_images(path: Path) -> Iterator[tuple[str, str, str, bytes]]:
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            _check_member(member, path)
            parts = Path(member.name).parts
            if not member.isfile() or Path(member.name).name.startswith("."):
                continue
            for i, part in enumerate(parts[:-2]):
                if part in _SPLITS and len(parts) - i == 3:
                    yield part, parts[i + 1], member.name, tar.extractfile(member).read()
                    break


def read_imagefolder_archive(
    path: Path, workers: int | None = None, expected: tuple[str, ...] | None = CIFAR10_CLASSES
) -> RawDataset:
    """Read an ImageFolder tree straight from a tar(.gz): no extraction, so no path can escape."""
    try:
        entries = _iter_tar_images(path)
        first = next(entries, None)
        if first is None:
            raise CifarError(
                f"archive {path} holds no ImageFolder tree (train/<class>/*, test/<class>/*) "
                "and no CIFAR-10 python batches."
            )
        return _to_dataset(itertools.chain([first], entries), str(path), "imagefolder-archive", workers, expected)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CifarError(f"archive {path} is truncated or corrupt ({exc}). Replace it and try again.") from None


def _read_directory(path: Path, workers: int | None, expected: tuple[str, ...] | None) -> RawDataset:
    if (path / _TRAIN_BATCHES[0]).is_file():
        return read_canonical_folder(path)
    if (path / "cifar-10-batches-py" / _TRAIN_BATCHES[0]).is_file():
        return read_canonical_folder(path / "cifar-10-batches-py")
    root = _imagefolder_root(path)
    if root is None:
        raise CifarError(
            f"folder {path} is neither cifar-10-batches-py/ nor an ImageFolder tree with "
            "train/<class>/ (and optionally test/<class>/) subfolders."
        )
    return read_imagefolder(root, workers, expected)


def _tar_names(path: Path) -> list[str]:
    try:
        with tarfile.open(path, "r:*") as tar:
            names = []
            for member in tar:
                names.append(member.name)
                if len(names) > 64:  # enough to tell the format; the rest is streamed later
                    break
            return names
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CifarError(f"archive {path} is truncated or corrupt ({exc}). Replace it and try again.") from None

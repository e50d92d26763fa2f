"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (Zalando Research): 70,000 28 x 28 grayscale
images of 10 clothing classes, read from its idx files, checked, and made 32 x 32 RGB.

``python -m cifar.data prepare --source fashion-mnist --dataset fashion-mnist``; the trust report
also reads its test images as out-of-distribution input for a CIFAR-10 model.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from cifar.contract.images import to_rgb32
from cifar.errors import CifarError

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# SHA-256 of each idx file's uncompressed bytes (Debian's dataset-fashion-mnist recompresses the
# .gz files, so the published MD5s of Zalando's archives do not apply to them).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def read_idx(path: Path, sha256: str) -> np.ndarray:
    """An idx file (``.gz``) as an array, its uncompressed bytes checked against ``sha256``."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise CifarError(
            f"{path}: cannot read it ({exc}); reinstall dataset-fashion-mnist (make system-deps)."
        ) from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CifarError(f"{path}: its contents do not match their known digest; reinstall dataset-fashion-mnist.")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3, labels) of ``train`` or ``t10k``: grayscale to RGB, 28 -> 32 px bicubic."""
    names = {kind: f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz" for kind in ("images", "labels")}
    missing = [n for n in names.values() if not (folder / n).is_file()]
    if missing:
        raise CifarError(
            f"Fashion-MNIST is not installed ({folder} lacks {', '.join(missing)}): "
            "make system-deps installs Debian's dataset-fashion-mnist (or set $CIFAR_FASHION_MNIST)."
        )
    raw = read_idx(folder / names["images"], FASHION_MNIST_FILES[names["images"]])
    labels = read_idx(folder / names["labels"], FASHION_MNIST_FILES[names["labels"]]).astype(np.int64)
    return np.stack([to_rgb32(Image.fromarray(image)) for image in raw]), labels

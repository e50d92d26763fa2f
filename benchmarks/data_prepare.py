"""Decoding the JPEG copy into the cache and loading it, against one ``ImageFolder`` + ``ToTensor`` pass over the
extracted files, which a conventional pipeline repeats every epoch.

    python benchmarks/data_prepare.py [--archive ../shared/data/cifar10-jpeg.tar.gz] [--quick]
"""

import tempfile
from collections import deque
from pathlib import Path

import numpy as np
from harness import extract_imagefolder, parser, record, timed
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from cifar.data import load_cache, prepare_cache

if __name__ == "__main__":
    args = parser(__doc__, "archive", quick="the same as the default (make bench runs it so)").parse_args()
    with tempfile.TemporaryDirectory(prefix="prepare-") as tmp:
        data, prep = timed(prepare_cache, str(args.archive), Path(tmp))
        _, load = timed(lambda: [np.asarray(a).sum(dtype=np.int64) for a in load_cache(Path(tmp)).images.values()])
    conventional = 0.0
    with tempfile.TemporaryDirectory(prefix="imagefolder-") as tmp:
        for split in ("train", "test"):
            images = datasets.ImageFolder(extract_imagefolder(args.archive, Path(tmp), split), transforms.ToTensor())
            conventional += timed(deque, DataLoader(images, batch_size=500, num_workers=2), maxlen=0)[1]  # one pass
    figures = {
        "images": sum(len(v) for v in data.labels.values()),
        "prepare s": prep,
        "load + read s": load,
        "ImageFolder pass s": conventional,
        "cached epoch x cheaper": conventional / load,
        "prepare / pass": prep / conventional,
    }
    record("data_prepare", figures, args)

"""Decoding the 60,000-image JPEG copy into the cache (target 20 s on 2 cores) and loading it, against one
conventional ``ImageFolder`` + ``ToTensor`` pass over the extracted files, which a conventional pipeline repeats
every epoch.

    python benchmarks/data_prepare.py [--archive ../shared/data/cifar10-jpeg.tar.gz] [--quick]
"""

import tempfile
import time
from pathlib import Path

import numpy as np
from harness import extract_imagefolder, parser, record
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from cifar.data import load_cache, prepare_cache

if __name__ == "__main__":
    p = parser(__doc__, "--archive", quick="the same as the default: under 2 minutes")
    args = p.parse_args()
    conventional = 0.0
    with tempfile.TemporaryDirectory(prefix="prepare-") as tmp:
        start = time.perf_counter()
        count = sum(len(v) for v in prepare_cache(str(args.archive), Path(tmp)).labels.values())
        prep = time.perf_counter() - start
        start = time.perf_counter()
        [np.asarray(a).sum(dtype=np.int64) for a in load_cache(Path(tmp)).images.values()]
        load = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="imagefolder-") as tmp:
        for split in ("train", "test"):
            images = datasets.ImageFolder(extract_imagefolder(args.archive, Path(tmp), split), transforms.ToTensor())
            start = time.perf_counter()
            for _ in DataLoader(images, batch_size=500, num_workers=2):
                pass
            conventional += time.perf_counter() - start
    figures = {
        "images": count,
        "prepare s": prep,
        "load + read s": load,
        "ImageFolder pass s": conventional,
        "cached epoch x cheaper": conventional / load,
        "prepare / pass": prep / conventional,
    }
    record("data_prepare", figures, write=not args.no_results)

"""Decoding the 60,000-image JPEG copy into the cache, against decoding it the conventional way.

    python benchmarks/data_prepare.py [--archive ../shared/data/cifar10-jpeg.tar.gz] [--repeats 1]

- prepare: ``prepare_cache`` from the archive (stream, decode in parallel, split, write) into a
  temporary folder; target 20 s on 2 cores;
- load: ``load_cache`` plus reading every array (what each later run pays);
- conventional: one pass of ``torchvision.datasets.ImageFolder`` + ``ToTensor`` through
  ``DataLoader(num_workers=2)`` over the extracted files, the decoding a conventional pipeline
  repeats every epoch (extraction not counted).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_ARCHIVE, extract_imagefolder, machine_name, record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="same as the default (one repeat): under 2 minutes")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()

    import numpy as np
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from cifar.data import load_cache, prepare_cache

    prepare_times, load_times = [], []
    for _ in range(1 if args.quick else args.repeats):
        with tempfile.TemporaryDirectory(prefix="prepare-") as tmp:
            start = time.perf_counter()
            data = prepare_cache(str(args.archive), Path(tmp))
            prepare_times.append(time.perf_counter() - start)
            count = sum(len(v) for v in data.labels.values())
            del data
            start = time.perf_counter()
            loaded = load_cache(Path(tmp))
            checksum = sum(int(np.asarray(a).sum(dtype=np.int64)) for a in loaded.images.values())
            load_times.append(time.perf_counter() - start)
            del loaded, checksum

    with tempfile.TemporaryDirectory(prefix="imagefolder-") as tmp:
        decoded, start = 0, 0.0
        for split in ("train", "test"):
            folder = extract_imagefolder(args.archive, Path(tmp), split)
            loader = DataLoader(
                datasets.ImageFolder(folder, transforms.ToTensor()), batch_size=500, num_workers=args.workers
            )
            begin = time.perf_counter()
            for x, _ in loader:
                decoded += len(x)
            start += time.perf_counter() - begin
        conventional = start

    prep, load = statistics.mean(prepare_times), statistics.mean(load_times)
    lines = [
        f"machine: {machine_name()}; archive {args.archive.name}, {count:,} images",
        f"prepare_cache: {prep:.1f} s (target 20 s; runs: {', '.join(f'{t:.1f}' for t in prepare_times)}); "
        f"load_cache + read all: {load:.2f} s",
        f"conventional ImageFolder + ToTensor pass, DataLoader(num_workers={args.workers}): {conventional:.1f} s "
        f"for {decoded:,} images, paid every epoch; a cached epoch's data costs {conventional / load:,.0f}x less, "
        f"and preparing once costs {prep / conventional:.2f} such passes",
    ]
    record("data_prepare", lines, write=not args.no_results)


if __name__ == "__main__":
    main()

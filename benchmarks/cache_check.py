"""What checking stored things costs: the data cache's SHA-256s on every load, a model copy's on reuse.

    python benchmarks/cache_check.py [--data-dir DIR | --archive ../shared/data/cifar10-jpeg.tar.gz]

- check: ``_check_files``, the SHA-256 of every cache file against the manifest (184 MB for
  CIFAR-10), with the files in the page cache (warm) and evicted from it first (cold);
- load: ``load_cache`` (check included) against memory-mapping the six files alone, the load
  before the check;
- model copy: ``files_digest`` of the bundled model folder, paid by each prediction served from
  the local copy of a registry model.

Without ``--data-dir`` the archive is prepared into a temporary folder first (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_ARCHIVE, ROOT, machine_name, record


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache, as after a reboot (Linux)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, repeats: int, before=None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, ``before()`` untimed ahead of each."""
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(data_dir: Path, repeats: int) -> list[str]:
    import numpy as np

    from cifar.data.cache import _check_files, load_cache
    from cifar.serve.modelcache import files_digest

    folder = data_dir / "cache"
    manifest = json.loads((folder / "manifest.json").read_text())
    size = sum((folder / name).stat().st_size for name in manifest["files"])
    check = timed(lambda: _check_files(folder, manifest), repeats)
    cold = timed(lambda: _check_files(folder, manifest), repeats, before=lambda: evict(folder))
    load = timed(lambda: load_cache(data_dir), repeats)
    mmap = timed(lambda: [np.load(folder / name, mmap_mode="r") for name in manifest["files"]], repeats)
    model = ROOT / "models" / "bundled"
    model_mb = sum(p.stat().st_size for p in model.iterdir()) / 1e6
    digest = timed(lambda: files_digest(model), repeats)
    return [
        f"machine: {machine_name()}; cache of {sum(manifest['counts'].values()):,} images, {size / 1e6:.0f} MB; "
        f"median of {repeats}",
        f"SHA-256 check of every cache file: {check:.3f} s warm, {cold:.3f} s cold (page cache evicted)",
        f"load_cache with the check: {load:.3f} s; memory-mapping alone (the load before the check): {mmap:.4f} s",
        f"model copy digest (models/bundled, {model_mb:.1f} MB): {1000 * digest:.1f} ms",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, help="a prepared cache to measure (default: prepare --archive)")
    p.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()

    if args.data_dir:
        lines = measure(args.data_dir, args.repeats)
    else:
        from cifar.data import prepare_cache

        with tempfile.TemporaryDirectory(prefix="cache-check-") as tmp:
            prepare_cache(str(args.archive), Path(tmp))
            lines = measure(Path(tmp), args.repeats)
    record("cache_check", lines, write=not args.no_results)


if __name__ == "__main__":
    main()

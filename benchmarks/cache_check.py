"""What checking stored things costs: the cache's SHA-256s on each load (warm; cold, page cache evicted; against
memory-mapping alone) and a model copy's digest, paid by each prediction from a local copy.

    python benchmarks/cache_check.py [--data-dir DIR | --archive ../shared/data/cifar10-jpeg.tar.gz] [--repeats 5]
"""

import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
from harness import ROOT, clock, parser, record

from cifar.data import prepare_cache
from cifar.data.cache import _check_files, load_cache
from cifar.serve.modelcache import files_digest


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache, as after a reboot (Linux)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


if __name__ == "__main__":
    p = parser(__doc__, "data-dir archive")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cache-check-") as tmp:
        if not args.data_dir:
            prepare_cache(str(args.archive), Path(tmp))
        folder = (data_dir := args.data_dir or Path(tmp)) / "cache"
        manifest = json.loads((folder / "manifest.json").read_text())
        files = [folder / name for name in manifest["files"]]

        def median(fn, before=lambda: None) -> float:
            return statistics.median(clock(fn, args.repeats, before=before))

        figures = {
            "cache MB": sum(f.stat().st_size for f in files) / 1e6,
            "check warm s": median(lambda: _check_files(folder, manifest)),
            "check cold s": median(lambda: _check_files(folder, manifest), lambda: evict(folder)),
            "load with check s": median(lambda: load_cache(data_dir)),
            "mmap load s": median(lambda: [np.load(f, mmap_mode="r") for f in files]),
            "model digest ms": 1000 * median(lambda: files_digest(ROOT / "models" / "bundled")),
        }
    record("cache_check", figures, args)

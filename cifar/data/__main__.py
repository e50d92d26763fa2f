"""``python -m cifar.data prepare|info``: decode a dataset (CIFAR-10 unless ``--dataset``) once into its cache."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cifar.cli import run_cli
from cifar.data.cache import DEFAULT_VAL_SIZE, default_data_dir, default_source, load_cache, prepare_cache


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="decode a source into the cache with a validation split")
    prepare.add_argument(
        "--source",
        default=default_source(),
        help="'cifar10' to download (default, or $CIFAR_SOURCE), 'fashion-mnist' (Debian's package), or a path: "
        "cifar-10-python.tar.gz, cifar-10-batches-py/, an ImageFolder tree (train/<class>/*, optionally "
        "test/<class>/*) or a .tar.gz of one",
    )
    prepare.add_argument(
        "--dataset",
        default=None,
        help="the dataset's name: cifar10 (default, in DATA_DIR/cache) or any other, in DATA_DIR/NAME/cache",
    )
    prepare.add_argument("--data-dir", default="", help="default $CIFAR_DATA or ./data")
    prepare.add_argument(
        "--val-size",
        type=int,
        default=None,
        help=f"validation images carved from train (default {DEFAULT_VAL_SIZE}, or a tenth of small sources)",
    )
    prepare.add_argument("--seed", type=int, default=0, help="seed of the stratified validation split")
    prepare.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    info = sub.add_parser("info", help="check every cache file against its manifest, then print it")
    info.add_argument("--data-dir", default="")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        started = time.perf_counter()
        source = args.source or default_source()  # "" (e.g. from MLproject) means the default
        data = prepare_cache(
            source,
            Path(args.data_dir) if args.data_dir else default_data_dir(),
            args.val_size or None,
            args.seed,
            args.workers,
            args.dataset,
        )
        sizes = data.sizes()
        print(
            f"Prepared {sum(sizes.values()):,} images of {len(data.classes)} classes from {source} in "
            f"{time.perf_counter() - started:.1f} s "
            f"-> {data.manifest['cache_dir']} (train {sizes['train']:,}, val {sizes['val']:,}, "
            f"test {sizes['test']:,}; digest {data.digest[:12]})"
        )
    else:
        print(json.dumps(load_cache(Path(args.data_dir) if args.data_dir else None).manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

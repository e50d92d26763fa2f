"""``python -m cifar predict IMAGE_OR_DIR... [--model-uri URI] [--top-k K] [--json] [--explain DIR]``.

Classifies image files (folders are searched recursively) with a logged or registered model.
Confidences are calibrated (the model's temperature); an image whose out-of-distribution score
is below the model's threshold is reported as not looking like any of the classes. ``--explain``
writes an occlusion map per image. Unreadable files are reported one by one while the rest are
classified; the exit code is 1 when any file could not be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cifar.cli import run_cli
from cifar.contract.images import decode_image
from cifar.contract.registered_model import model_name, production_uri
from cifar.errors import CifarError
from cifar.serve.inference import DEFAULT_MODEL_URI, NOT_ONE_OF_THE_CLASSES, Predictor
from cifar.serve.occlusion import heatmap_overlay

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


def collect(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)  # a named file is tried whatever its extension
    if not files:
        raise CifarError(f"no image files in {', '.join(paths)}.")
    return files


def write_explanation(predictor: Predictor, path: Path, folder: Path, number: int) -> Path:
    """The occlusion map of one image as ``folder/NNNN_<name>.png`` (numbered: names may repeat)."""
    folder.mkdir(parents=True, exist_ok=True)
    array = decode_image(path, str(path))
    target = folder / f"{number:04d}_{path.stem}.png"
    heatmap_overlay(array, predictor.explain(array), size=192).save(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument(
        "--model-uri",
        help=f"models:/name@alias, runs:/ID/model, a model folder or an .onnx file (default {DEFAULT_MODEL_URI})",
    )
    parser.add_argument("--dataset", help="default model: that dataset's production one (NAME-classifier)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument("--explain", type=Path, metavar="DIR", help="write an occlusion map per image here")
    args = parser.parse_args(argv)
    files = collect(args.paths)
    predictor = Predictor.from_uri(args.model_uri or production_uri(model_name(args.dataset)))
    results = predictor.predict_files(files, top_k=args.top_k)
    failed = 0
    records = []
    for path, result in zip(files, results):
        if isinstance(result, str):
            failed += 1
            records.append({"path": str(path), "error": result})
            if not args.json:
                print(f"{path}: ERROR {result}", file=sys.stderr)
        else:
            record = result.as_dict(str(path), predictor.description)
            if args.explain:
                record["explanation"] = str(write_explanation(predictor, path, args.explain, len(records)))
            records.append(record)
            if not args.json:
                others = ", ".join(f"{label} {p:.1%}" for label, p in result.top_k[1:])
                verdict = f"{result.label} ({result.confidence:.1%})"
                if not result.in_distribution:
                    verdict = f"{NOT_ONE_OF_THE_CLASSES} (best guess {verdict})"
                print(f"{path}: {verdict}" + (f"  [{others}]" if others else ""))
    if args.json:
        print(json.dumps(records, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

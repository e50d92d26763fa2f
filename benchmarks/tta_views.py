"""Test-time augmentation, side by side: the same trained weights scored with each TTA.

    python train.py --experiment cpu --epochs 6 --no-track --save-dir out/cpu6   # any saved weights
    python benchmarks/tta_views.py out/cpu6 [more folders ...]

For each ``--save-dir`` folder: validation and test accuracy with no TTA, flip (the recipes'
default until 2026-12-03) and flip + translate by 1 and 2 pixels (airbench's mirror + translate,
``train.tta_translate``), and the forward passes each costs per image. The weights never change,
so the differences are the TTA's alone. Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _common import machine_name, record

from cifar.data import load_cache
from cifar.engine import evaluate, native_bf16
from cifar.engine.steps import tta_views
from cifar.run.export import load_weights

SETTINGS = [("none", False, 0), ("flip", True, 0), ("flip + translate 1", True, 1), ("flip + translate 2", True, 2)]


def score(folder: Path, data, device: torch.device) -> dict[str, dict[str, float]]:
    """{setting: {split: accuracy %}} for the weights in ``folder``."""
    model, _ = load_weights(folder)
    model = model.to(device)
    amp = native_bf16(device)  # as the recipes evaluate
    scores: dict[str, dict[str, float]] = {}
    for name, tta, translate in SETTINGS:
        for split in ("val", "test"):
            result = evaluate(model, data.images[split], data.labels[split], device=device, tta=tta,
                              tta_translate=translate, amp=amp)  # fmt: skip
            scores.setdefault(name, {})[split] = 100 * result.accuracy
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="--save-dir folders of trained weights")
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_cache()
    runs = [score(folder, data, device) for folder in args.folders]
    probe = torch.zeros(1, 3, 32, 32)
    lines = [
        f"machine: {machine_name(device.type)}; {len(runs)} trained model(s): {', '.join(map(str, args.folders))}",
        "",
        "| TTA | passes per image | val % (mean) | test % (mean) | test gain over flip (points, per model) |",
        "|---|---|---|---|---|",
    ]
    for name, tta, translate in SETTINGS:
        val = statistics.mean(r[name]["val"] for r in runs)
        test = statistics.mean(r[name]["test"] for r in runs)
        gains = ", ".join(f"{r[name]['test'] - r['flip']['test']:+.2f}" for r in runs)
        lines.append(f"| {name} | {len(tta_views(probe, tta, translate))} | {val:.2f} | {test:.2f} | {gains} |")
    record("TTA views on the same weights (`benchmarks/tta_views.py`)", lines, write=not args.no_record)


if __name__ == "__main__":
    main()

"""Test-time augmentation, side by side: the same trained weights scored with no TTA, flip, and flip + translate by
1 and 2 pixels (validation and test accuracy, mean over the folders; passes per image).

    python train.py --experiment cpu --epochs 6 --no-track --save-dir out/cpu6   # any saved weights
    python benchmarks/tta_views.py out/cpu6 [more folders ...]
"""

import statistics
from functools import partial
from pathlib import Path

import torch
from harness import parser, record

from cifar.data import load_cache
from cifar.engine import evaluate, native_bf16, resolve_device
from cifar.engine.steps import tta_views
from cifar.run.export import load_weights

SETTINGS = [("none", False, 0), ("flip", True, 0), ("flip + translate 1", True, 1), ("flip + translate 2", True, 2)]
SPLITS = ("val", "test")


def score(folder: Path, data, device: torch.device) -> dict[str, dict[str, float]]:
    """{setting: {split: accuracy %}} for the weights in ``folder``, evaluated as the recipes evaluate."""
    run = partial(evaluate, load_weights(folder)[0].to(device), device=device, amp=native_bf16(device))
    return {
        name: {s: 100 * run(data.images[s], data.labels[s], tta=tta, tta_translate=shift).accuracy for s in SPLITS}
        for name, tta, shift in SETTINGS
    }


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("folders", nargs="+", type=Path, help="--save-dir folders of trained weights")
    args = p.parse_args()
    device, data = resolve_device("auto"), load_cache()
    runs, figures = [score(folder, data, device) for folder in args.folders], {"models": len(args.folders)}
    for name, tta, shift in SETTINGS:
        figures[f"{name}: passes"] = len(tta_views(torch.zeros(1, 3, 32, 32), tta, shift))
        figures |= {f"{name}: {s} %": statistics.mean(r[name][s] for r in runs) for s in SPLITS}
    record("tta_views", figures, args, device=device.type)

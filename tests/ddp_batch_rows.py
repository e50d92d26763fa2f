"""Run by tests/test_distributed.py under torchrun: which images each rank trains on, step by step.

Writes ``$OUT/rank<R>.json``: per step, a hash of every image row this rank's model received,
and the rows of the whole global batch, drawn again from a fresh loader with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from cifar.config import load_experiment
from cifar.data import load_cache
from cifar.data.loader import Augmentation, DeviceLoader
from cifar.engine.loop import begin_epoch, prepare_training, train_one_epoch
from cifar.engine.models import create_model
from cifar.run.distributed import process_group


def row_hashes(x: torch.Tensor) -> list[str]:
    return [hashlib.sha256(row.contiguous().numpy().tobytes()).hexdigest()[:16] for row in x]


def main() -> None:
    cfg = load_experiment("smoke", ["train.batch_size=64", "train.seed=5"])
    data = load_cache(Path(os.environ["CIFAR_DATA"]))
    with process_group(torch.device("cpu")) as group:
        model = create_model(cfg.model.name, num_classes=10, mean=data.mean, std=data.std)
        run = prepare_training(model, data, cfg, torch.device("cpu"))
        run.wrap()
        seen: list[list[str]] = []
        model.register_forward_pre_hook(lambda module, args: seen.append(row_hashes(args[0].detach())))
        begin_epoch(run, 1)
        train_one_epoch(run, 1)
        reference = DeviceLoader(
            data.images["train"], data.labels["train"], cfg.train.batch_size, torch.device("cpu"),
            augmentation=Augmentation.from_config(cfg.augment), shuffle=True, drop_last=True, seed=cfg.train.seed,
        )  # fmt: skip
        reference.set_epoch(1)
        batches = [row_hashes(x) for x, _ in reference]
        out = Path(os.environ["OUT"]) / f"rank{group.rank}.json"
        out.write_text(json.dumps({"world": group.world_size, "steps": seen, "global": batches}))


if __name__ == "__main__":
    sys.exit(main())

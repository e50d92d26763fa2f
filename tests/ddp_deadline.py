"""Run by tests/test_distributed.py under torchrun: each rank fits against its own deadline.

Rank 0's deadline has passed; rank 1's is a day away. Writes ``$OUT/rank<R>.json`` with the
epochs each rank trained and the moves it recorded: rank 0 decides for both, or they would
part ways at the next collective.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from cifar.config import load_experiment
from cifar.data import load_cache
from cifar.engine import fit
from cifar.engine.horizon import Deadline
from cifar.engine.models import create_model
from cifar.run.distributed import process_group


def main() -> None:
    cfg = load_experiment("smoke", ["train.batch_size=64", "train.epochs=4", "train.eval_every=0"])
    data = load_cache(Path(os.environ["CIFAR_DATA"]))
    with process_group(torch.device("cpu")) as group:
        model = create_model(cfg.model.name, num_classes=10, mean=data.mean, std=data.std)
        deadline = Deadline(time.perf_counter() + (-1.0 if group.rank == 0 else 86_400.0), val_seconds=0.0)
        result = fit(model, data, cfg, torch.device("cpu"), deadline=deadline)
        out = Path(os.environ["OUT"]) / f"rank{group.rank}.json"
        out.write_text(json.dumps({"epochs": [m.epoch for m in result.history], "replans": result.replans}))


if __name__ == "__main__":
    sys.exit(main())

"""Run by tests/test_gpu.py under torchrun: train.py as users run it, recording what this rank does.

Wraps the run's training (``_fit``), its test pass (``_served_evaluate``) and calibration
(``serve_model``); each rank writes ``$OUT/rank<R>.json``: its exit code and the steps it ran, in
order, each with the device it ran on.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import cifar.run.calibration
import cifar.run.training
import train
from cifar.cli import run_cli

steps: list[tuple[str, str]] = []


def record(module, name: str, step: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        steps.append((step, str(args[3])))  # all three take the device fourth
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def main() -> int:
    record(cifar.run.training, "_fit", "train")
    record(cifar.run.training, "_served_evaluate", "test")
    record(cifar.run.calibration, "serve_model", "calibrate")  # called through the module: the wrapper is seen
    code = run_cli(train.main, sys.argv[1:])
    out = Path(os.environ["OUT"]) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps({"exit": code, "steps": steps}))
    return code


if __name__ == "__main__":
    sys.exit(main())

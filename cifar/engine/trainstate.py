"""Everything ``engine.fit`` needs to continue exactly where it stopped, as tensors + JSON.

Model, optimizer (momentum buffers and groups), scheduler, EMA, Lookahead's slow weights, the best
epoch's weights so far, the partial epoch's running sums, history and RNG states.
``cifar.run.checkpoint`` writes it to disk; this module never touches files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainingState:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        return self.info["epoch"]

    @property
    def step(self) -> int:
        return self.info["step"]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on request (SIGTERM, Ctrl-C) after a whole step; carries the state to save.

    A KeyboardInterrupt, so everything that handles Ctrl-C (the MLflow run ends KILLED, the CLI
    exits 130) handles it too.
    """

    def __init__(self, state: TrainingState) -> None:
        super().__init__(f"interrupted at epoch {state.epoch}, step {state.step}")
        self.state = state


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def capture_state(
    *,
    model,
    optimizer,
    scheduler,
    ema,
    lookahead=None,
    best_state: dict[str, torch.Tensor] | None,
    result,
    epoch: int,
    step: int,
    sums: torch.Tensor,
    seen: int,
) -> TrainingState:
    """Snapshot after ``step`` whole batches of ``epoch`` (step 0 = the epoch has not started)."""
    tensors = _prefixed("model", model.state_dict())
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    if ema is not None:
        tensors.update(_prefixed("ema", ema.state_dict()))
    if lookahead is not None:
        tensors.update(_prefixed("lookahead", lookahead.state_dict()))
    if best_state is not None:
        tensors.update(_prefixed("best", best_state))
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["sums"] = sums.detach().float()
    np_state = np.random.get_state()
    info = {
        "epoch": epoch,
        "step": step,
        "seen": seen,
        "optimizer_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "history": [asdict(m) for m in result.history],
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "train_seconds": result.train_seconds,
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return TrainingState(tensors, info)


def restore_state(state: TrainingState, *, model, optimizer, scheduler, ema, device, lookahead=None) -> dict[str, Any]:
    """Load ``state`` into the training objects; returns the loop's own values (best weights, sums)."""
    tensors, info = state.tensors, state.info
    model.load_state_dict(_unprefixed("model", tensors))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value.to(device)
    for index, values in info["optimizer_scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": info["optimizer_groups"]})
    scheduler.load_state_dict(info["scheduler"])
    if ema is not None:
        ema.load_state_dict(_unprefixed("ema", tensors))
    if lookahead is not None:
        lookahead.load_state_dict(_unprefixed("lookahead", tensors))
    torch.set_rng_state(tensors["rng.torch"])
    kind, keys, *rest = info["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    best = _unprefixed("best", tensors)
    return {
        "best_state": {k: v.to(device) for k, v in best.items()} or None,
        "sums": tensors["sums"].to(device),
    }

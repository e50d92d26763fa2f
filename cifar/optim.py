"""Optimizer, learning-rate schedule and Lookahead for ``engine.fit``.

The recipes follow airbench (Jordan, 2024): Nesterov SGD with faster BatchNorm/bias rates, a
one-cycle schedule, and Lookahead whose averaging grows towards the end of training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cifar.config import ExperimentConfig
from cifar.errors import CifarError


def lr_factor(schedule: str, warmup: float, final: float) -> Callable[[float], float]:
    """Learning-rate multiplier as a function of progress in [0, 1]."""

    def factor(progress: float) -> float:
        if schedule == "constant":
            return 1.0
        if warmup > 0 and progress < warmup:
            return progress / warmup
        rest = (progress - warmup) / max(1e-8, 1 - warmup)
        if schedule == "cosine":
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * rest))
        return final + (1 - final) * (1 - rest)  # onecycle: linear decay

    if schedule not in ("onecycle", "cosine", "constant"):
        raise CifarError(f"unknown schedule.name '{schedule}': use onecycle, cosine or constant.")
    return factor


def build_optimizer(model: nn.Module, cfg: ExperimentConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    # BatchNorm and bias parameters learn faster (bias_lr_scale) with the same per-step decay,
    # as in airbench; conv/linear weights take the base rate.
    weights = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    biases = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    scale = o.bias_lr_scale
    groups = [
        {"params": weights, "weight_decay": o.weight_decay, "lr": o.lr},
        {"params": biases, "weight_decay": o.weight_decay / scale, "lr": o.lr * scale},
    ]
    fused = device.type == "cuda"
    if o.name == "sgd":
        return torch.optim.SGD(
            groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, fused=fused
        )
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, fused=fused)
    raise CifarError(f"unknown optim.name '{o.name}': use sgd or adamw.")


class Lookahead:
    """Slow weights that the model is pulled back to every ``every`` steps (Zhang et al., 2019).

    As in airbench, the pull strength follows ``decay * progress**3``: almost nothing early on,
    strong averaging in the last part of the schedule, and ``finish`` hands the model the slow
    weights. Covers the float state (parameters and BatchNorm statistics), not step counters.
    """

    def __init__(self, model: nn.Module, decay: float = 0.95, every: int = 5) -> None:
        self.model, self.decay, self.every = model, decay, every
        self.slow = {k: v.detach().clone() for k, v in self._fast().items()}

    def _fast(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int, total_steps: int) -> None:
        """Call after optimizer step ``step`` (1-based) of ``total_steps``."""
        if step % self.every:
            return
        keep = self.decay**self.every * (step / total_steps) ** 3
        for name, fast in self._fast().items():
            slow = self.slow[name]
            slow.lerp_(fast, 1 - keep)
            fast.copy_(slow)

    @torch.no_grad()
    def finish(self) -> None:
        for name, fast in self._fast().items():
            fast.copy_(self.slow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.slow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, slow in self.slow.items():
            slow.copy_(state[name])

"""One step and one evaluation pass: tensors in, metrics out. No files, no MLflow.

Model selection is honest: the best epoch is chosen on the validation split; the test split
is only ever passed to ``evaluate`` once, by the caller, at the very end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cifar.data.loader import images_to_tensor
from cifar.errors import CifarError


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float | None  # None: not validated this epoch (train.eval_every)
    val_accuracy: float | None
    learning_rate: float
    images_per_second: float
    epoch_seconds: float

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "epoch" and v is not None}


@dataclass
class FitResult:
    history: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    train_seconds: float = 0.0  # the timed loop, from the first step to the last epoch's end
    compile_seconds: float = 0.0  # train.compile: the warm-up that compiles before the clock starts
    recompiles: int = 0  # graphs torch.compile built inside the timed loop
    replans: list[str] = field(default_factory=list)  # each move of the last epoch against a deadline, and why


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    logits: np.ndarray  # N x classes, float32
    labels: np.ndarray
    features: np.ndarray | None = None  # N x D (with_features): what the out-of-distribution score reads

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(1)


EpochCallback = Callable[[EpochMetrics], None]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CifarError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto.")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise CifarError(f"unknown device '{name}': use auto, cpu or cuda[:N].")
    return torch.device(name)


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int, deterministic: bool = False) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def device_kind(device: torch.device) -> str:
    """What a recipe's ``devices:`` section calls this machine: cuda, cpu_bf16 (native bf16) or cpu_fp32."""
    if device.type == "cuda":
        return "cuda"
    return "cpu_bf16" if native_bf16(device) else "cpu_fp32"


def native_bf16(device: torch.device) -> bool:
    """True where bf16 autocast is fast: GPUs of compute capability 8+ (Ampere on), CPUs with AMX or
    AVX512-BF16 (oneDNN).

    Elsewhere bf16 is emulated and slower than fp32, so autocast stays off.
    ``torch.cuda.is_bf16_supported()`` answers True for emulated bf16 too (Volta, Turing), so
    the GPU's capability decides.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and native_bf16(device))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    amp: bool = True,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch already on the device; returns (loss, logits), not synced."""
    with _autocast(x.device, amp):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def tta_views(x: torch.Tensor, tta: bool, translate: int = 0) -> list[tuple[float, torch.Tensor]]:
    """The views a float batch (B x C x H x W) is scored on, with the weight of each in the average.

    No TTA: the batch. ``tta``: the batch and its mirror, half each. ``translate`` pixels as well
    (airbench's mirror + translate): that pair weighs half, and the batch shifted up-left and
    down-right by ``translate`` (reflect-padded), each with its mirror, the other half.
    Evaluation and the exported graph both score through this, so they agree by construction.
    """
    if not tta:
        return [(1.0, x)]
    if not translate:
        return [(0.5, x), (0.5, x.flip(3))]
    h, w = x.shape[-2:]
    padded = F.pad(x, (translate,) * 4, mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2 * translate :, 2 * translate :]]
    return [(0.25, x), (0.25, x.flip(3))] + [(0.125, view) for s in shifted for view in (s, s.flip(3))]


def tta_average(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor, tta: bool, translate: int = 0
) -> tuple[torch.Tensor, ...]:
    """``forward``'s outputs (a tuple of tensors) averaged over ``tta_views``."""
    total: list[torch.Tensor] | None = None
    for weight, view in tta_views(x, tta, translate):
        outputs = [out if weight == 1.0 else weight * out for out in forward(view)]
        total = outputs if total is None else [a + b for a, b in zip(total, outputs)]
    return tuple(total)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 1000,
    tta: bool = False,
    tta_translate: int = 0,
    amp: bool = True,
    channels_last: bool = False,
    with_features: bool = False,
) -> EvalResult:
    """Loss, accuracy and logits over a whole split, averaged over ``tta_views`` with TTA.

    ``with_features`` also returns the features ``forward_features`` gives (averaged the same way),
    as the served graph computes them.
    """
    model.eval()
    data = images if isinstance(images, torch.Tensor) else images_to_tensor(images, device)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if with_features:
            logits, features = model.forward_features(x)
            return logits.float(), features.float()
        return (model(x).float(),)

    outputs, feature_batches = [], []
    for start in range(0, len(data), batch_size):
        x = data[start : start + batch_size].float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits, *features = tta_average(forward, x, tta, tta_translate)
        outputs.append(logits)
        feature_batches.extend(features)
    logits = torch.cat(outputs) if outputs else torch.zeros(0, 10, device=device)
    target = torch.as_tensor(np.asarray(labels), device=device)
    loss = F.cross_entropy(logits, target).item() if len(target) else float("nan")
    accuracy = (logits.argmax(1) == target).float().mean().item() if len(target) else float("nan")
    features = torch.cat(feature_batches).cpu().numpy() if with_features and feature_batches else None
    return EvalResult(loss, accuracy, logits.cpu().numpy(), np.asarray(labels), features)

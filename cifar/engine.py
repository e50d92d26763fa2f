"""Training and evaluation loops: tensors in, metrics out. No files, no MLflow.

Model selection is honest: the best epoch is chosen on the validation split; the test split
is only ever passed to ``evaluate`` once, by the caller, at the very end.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cifar.config import ExperimentConfig
from cifar.data.loader import Augmentation, DeviceLoader, images_to_tensor
from cifar.errors import CifarError


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float
    images_per_second: float
    epoch_seconds: float

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "epoch"}


@dataclass
class FitResult:
    history: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    train_seconds: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    logits: np.ndarray  # N x classes, float32
    labels: np.ndarray

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


def seed_everything(seed: int, deterministic: bool = False) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _lr_factor(schedule: str, warmup: float, final: float) -> Callable[[float], float]:
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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 1000,
    tta: bool = False,
    amp: bool = True,
    channels_last: bool = False,
) -> EvalResult:
    """Loss, accuracy and logits over a whole split (optionally averaging a horizontal flip)."""
    model.eval()
    data = images if isinstance(images, torch.Tensor) else images_to_tensor(images, device)
    outputs = []
    for start in range(0, len(data), batch_size):
        x = data[start : start + batch_size].float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(x.flip(3)).float())
        outputs.append(logits)
    logits = torch.cat(outputs) if outputs else torch.zeros(0, 10, device=device)
    target = torch.as_tensor(np.asarray(labels), device=device)
    loss = F.cross_entropy(logits, target).item() if len(target) else float("nan")
    accuracy = (logits.argmax(1) == target).float().mean().item() if len(target) else float("nan")
    return EvalResult(loss, accuracy, logits.cpu().numpy(), np.asarray(labels))


def fit(
    model: nn.Module,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    cfg: ExperimentConfig,
    device: torch.device,
    *,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` in place; leave it holding the weights of the best validation epoch."""
    t = cfg.train
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = DeviceLoader(
        train_images,
        train_labels,
        t.batch_size,
        device,
        augmentation=Augmentation(cfg.augment.flip, cfg.augment.translate, cfg.augment.cutout),
        shuffle=True,
        drop_last=True,
        seed=t.seed,
        channels_last=t.channels_last,
    )
    val_tensor = images_to_tensor(val_images, device)
    if hasattr(model, "init_from_data"):
        spread = torch.linspace(0, len(loader.images) - 1, min(5000, len(loader.images)), device=device).long()
        sample = loader.images[spread].float().div(255)  # every class, whatever the storage order
        model.init_from_data(sample)

    optimizer = build_optimizer(model, cfg, device)
    total_steps = max(1, t.epochs * len(loader))
    factor = _lr_factor(cfg.schedule.name, cfg.schedule.warmup_fraction, cfg.schedule.final_lr_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step / total_steps))
    ema = None
    if t.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay), use_buffers=True
        )
    step_model = torch.compile(model) if t.compile else model

    result = FitResult()
    best_state = None
    started = time.perf_counter()
    for epoch in range(1, t.epochs + 1):
        loader.set_epoch(epoch)
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(
            loader, desc=f"epoch {epoch}/{t.epochs}", unit="batch", leave=False, disable=not progress, mininterval=1.0
        )
        for step, (x, y) in enumerate(bar):
            with _autocast(device, t.amp):
                logits = step_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if progress and step % 10 == 0:  # .item() syncs the GPU: not every step
                rate = seen / max(1e-9, time.perf_counter() - epoch_start)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{(correct / seen).item():.3f}", img_s=f"{rate:.0f}")
        train_loss = (loss_sum / max(1, seen)).item()
        if not math.isfinite(train_loss):
            raise CifarError(f"training diverged at epoch {epoch} (loss {train_loss}); lower optim.lr and try again.")
        train_time = time.perf_counter() - epoch_start
        eval_model = ema.module if ema is not None else model
        val = evaluate(
            eval_model,
            val_tensor,
            val_labels,
            device=device,
            batch_size=t.eval_batch_size,
            tta=t.tta,
            amp=t.amp,
            channels_last=t.channels_last,
        )
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=(correct / max(1, seen)).item(),
            val_loss=val.loss,
            val_accuracy=val.accuracy,
            learning_rate=optimizer.param_groups[0]["lr"],
            images_per_second=seen / max(1e-9, train_time),
            epoch_seconds=time.perf_counter() - epoch_start,
        )
        result.history.append(metrics)
        if val.accuracy > result.best_val_accuracy or best_state is None:
            result.best_epoch, result.best_val_accuracy = epoch, val.accuracy
            best_state = copy.deepcopy(eval_model.state_dict())
        if progress:
            tqdm.write(
                f"epoch {epoch:>3}/{t.epochs}  train loss {metrics.train_loss:.4f} acc {metrics.train_accuracy:.4f}  "
                f"val loss {val.loss:.4f} acc {val.accuracy:.4f}  {metrics.images_per_second:,.0f} img/s  "
                f"{metrics.epoch_seconds:.1f} s"
            )
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    result.train_seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    return result

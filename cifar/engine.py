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
from cifar.optim import Lookahead, build_optimizer, lr_factor
from cifar.trainstate import TrainingInterrupted, TrainingState, capture_state, restore_state


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
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int, deterministic: bool = False) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def native_bf16(device: torch.device) -> bool:
    """True where bf16 autocast is fast: CUDA GPUs, and CPUs with AMX or AVX512-BF16 (oneDNN).

    Elsewhere bf16 on CPU is emulated and slower than fp32, so autocast stays off.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
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
    with_features: bool = False,
) -> EvalResult:
    """Loss, accuracy and logits over a whole split (optionally averaging a horizontal flip).

    ``with_features`` also returns the features ``forward_features`` gives (flip-averaged with TTA),
    as the served graph computes them.
    """
    model.eval()
    data = images if isinstance(images, torch.Tensor) else images_to_tensor(images, device)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if with_features:
            logits, features = model.forward_features(x)
            return logits.float(), features.float()
        return model(x).float(), None

    outputs, feature_batches = [], []
    for start in range(0, len(data), batch_size):
        x = data[start : start + batch_size].float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits, features = forward(x)
            if tta:
                mirror_logits, mirror_features = forward(x.flip(3))
                logits = 0.5 * (logits + mirror_logits)
                features = None if features is None else 0.5 * (features + mirror_features)
        outputs.append(logits)
        feature_batches.append(features)
    logits = torch.cat(outputs) if outputs else torch.zeros(0, 10, device=device)
    target = torch.as_tensor(np.asarray(labels), device=device)
    loss = F.cross_entropy(logits, target).item() if len(target) else float("nan")
    accuracy = (logits.argmax(1) == target).float().mean().item() if len(target) else float("nan")
    features = torch.cat(feature_batches).cpu().numpy() if with_features and feature_batches else None
    return EvalResult(loss, accuracy, logits.cpu().numpy(), np.asarray(labels), features)


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
    progress_bar: bool = True,
    resume: TrainingState | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[TrainingState], None] | None = None,
) -> FitResult:
    """Train ``model`` in place; leave it holding the weights of the best validation epoch.

    ``progress`` prints a line per epoch; ``progress_bar`` adds a per-step bar to it.
    ``resume`` continues from a captured state (same batches, same augmentation: on CPU in
    deterministic mode the final weights are bit-identical to an uninterrupted run).
    ``should_stop`` is polled after every step; when it answers True, fit raises
    ``TrainingInterrupted`` carrying the state. ``on_checkpoint`` gets the state every
    ``train.checkpoint_every`` epochs (only after a finite epoch: the last one is always good).
    """
    t = cfg.train
    if t.whiten_bias_epochs < 0:
        raise CifarError(f"train.whiten_bias_epochs must be 0 (always learns) or more, got {t.whiten_bias_epochs}.")
    if t.whiten_bias_epochs and not getattr(model, "can_freeze_stem", False):
        raise CifarError(
            f"train.whiten_bias_epochs needs a model with a whitening stem (fastnet); {cfg.model.name} has none: "
            "set it to 0."
        )  # checked before training, not after its first epochs
    if t.low_res_epochs < 0 or not 16 <= t.low_res <= 32:
        raise CifarError(
            f"train.low_res_epochs must be 0 or more (got {t.low_res_epochs}) and train.low_res between 16 and 32 "
            f"pixels (got {t.low_res})."
        )
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = DeviceLoader(
        train_images,
        train_labels,
        t.batch_size,
        device,
        augmentation=Augmentation.from_config(cfg.augment),
        shuffle=True,
        drop_last=True,
        seed=t.seed,
        channels_last=t.channels_last,
    )
    val_tensor = images_to_tensor(val_images, device)
    if hasattr(model, "init_from_data") and resume is None:
        spread = torch.linspace(0, len(loader.images) - 1, min(5000, len(loader.images)), device=device).long()
        sample = loader.images[spread].float().div(255)  # every class, whatever the storage order
        model.init_from_data(sample)

    rank, world = distributed_rank_world()
    if t.batch_size % world:
        raise CifarError(f"train.batch_size {t.batch_size} must divide among {world} processes; pick a multiple.")
    optimizer = build_optimizer(model, cfg, device)
    total_steps = max(1, t.epochs * len(loader))
    factor = lr_factor(cfg.schedule.name, cfg.schedule.warmup_fraction, cfg.schedule.final_lr_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step / total_steps))
    ema = None
    if t.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay), use_buffers=True
        )
    lookahead = Lookahead(model) if t.lookahead else None

    def wrapped() -> nn.Module:
        step_model = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(step_model) if t.compile else step_model

    step_model = wrapped()

    result = FitResult()
    best_state = None
    start_epoch, skip_steps, resumed_sums, resumed_seen = 1, 0, None, 0
    if resume is not None:
        restored = restore_state(
            resume, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, lookahead=lookahead, device=device
        )
        best_state = restored["best_state"]
        result.history = [EpochMetrics(**m) for m in resume.info["history"]]
        result.best_epoch, result.best_val_accuracy = resume.info["best_epoch"], resume.info["best_val_accuracy"]
        start_epoch, skip_steps = resume.epoch, resume.step
        resumed_sums, resumed_seen = restored["sums"], resume.info["seen"]

    def snapshot(epoch: int, step: int, sums: torch.Tensor, seen: int) -> TrainingState:
        result.train_seconds = time.perf_counter() - started
        return capture_state(
            model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, lookahead=lookahead,
            best_state=best_state, result=result, epoch=epoch, step=step, sums=sums, seen=seen,
        )  # fmt: skip

    started = time.perf_counter()
    for epoch in range(start_epoch, t.epochs + 1):
        loader.set_epoch(epoch)
        loader.image_size = t.low_res if epoch <= t.low_res_epochs else None
        model.train()
        if 0 < t.whiten_bias_epochs < epoch and model.freeze_stem():
            step_model = wrapped()  # DDP must not wait for gradients the stem no longer has
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        skip = skip_steps if epoch == start_epoch else 0
        if skip and resumed_sums is not None:
            loss_sum, correct, seen = resumed_sums[0].clone(), resumed_sums[1].clone(), resumed_seen
        show_bar = progress and progress_bar
        bar = tqdm(
            loader, desc=f"epoch {epoch}/{t.epochs}", unit="batch", leave=False, disable=not show_bar, mininterval=1.0
        )
        for step, (x, y) in enumerate(bar):
            if step < skip:  # resuming mid-epoch: the batch is drawn (same generator state), not trained
                continue
            if world > 1:
                # Every rank draws the same global batch (order and augmentation from the shared
                # seed) and keeps its own rows: the run matches a single process with that batch.
                x, y = x[rank::world], y[rank::world]
            loss, logits = train_step(step_model, optimizer, x, y, amp=t.amp, label_smoothing=t.label_smoothing)
            scheduler.step()
            if lookahead is not None:
                lookahead.step((epoch - 1) * len(loader) + step + 1, total_steps)
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if show_bar and step % 10 == 0:  # .item() syncs the GPU: not every step
                rate = seen / max(1e-9, time.perf_counter() - epoch_start)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{(correct / seen).item():.3f}", img_s=f"{rate:.0f}")
            if should_stop is not None and should_stop():
                raise TrainingInterrupted(snapshot(epoch, step + 1, torch.stack([loss_sum, correct]), seen))
        seen_all = torch.tensor(float(seen), device=device)
        if world > 1:
            import torch.distributed as dist

            for total in (loss_sum, correct, seen_all):
                dist.all_reduce(total)
        train_loss = (loss_sum / seen_all.clamp(min=1)).item()
        if not math.isfinite(train_loss):
            raise CifarError(
                f"training diverged at epoch {epoch} (loss {train_loss}); lower optim.lr and try again "
                "(the last checkpoint, if any, holds the last finite epoch)."
            )
        if lookahead is not None and epoch == t.epochs:
            lookahead.finish()
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
            train_accuracy=(correct / seen_all.clamp(min=1)).item(),
            val_loss=val.loss,
            val_accuracy=val.accuracy,
            learning_rate=optimizer.param_groups[0]["lr"],
            images_per_second=seen_all.item() / max(1e-9, train_time),
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
        if on_checkpoint is not None and t.checkpoint_every and (epoch % t.checkpoint_every == 0 or epoch == t.epochs):
            on_checkpoint(snapshot(epoch + 1, 0, torch.zeros(2, device=device), 0))
    result.train_seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    return result

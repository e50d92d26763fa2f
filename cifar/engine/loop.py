"""The training loop: ``fit`` = prepare, then per epoch begin -> train_one_epoch -> end_epoch -> after_epoch.

Tensors in, metrics out; no files, no MLflow. Checkpoints, epoch metrics and stopping reach the
caller through the ``Hooks`` ``fit`` takes. The recipe stays as given: the schedule's length is
the ``Horizon``'s, which a deadline can move.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from cifar.config import ExperimentConfig
from cifar.data.loader import Augmentation, DeviceLoader, images_to_tensor
from cifar.engine.horizon import Deadline, Horizon, keep_deadline, stretch_last_epoch
from cifar.engine.optim import Lookahead, build_optimizer, lr_factor
from cifar.engine.steps import (
    EpochCallback,
    EpochMetrics,
    FitResult,
    distributed_rank_world,
    evaluate,
    train_step,
)
from cifar.engine.trainstate import TrainingInterrupted, TrainingState, capture_state, restore_state
from cifar.errors import CifarError

# Steps between the DDP ranks' stop votes: a one-number all-reduce (a GPU sync) every 8 steps,
# not every step; a stop waits at most 7 steps.
STOP_VOTE_EVERY = 8


@dataclass(frozen=True)
class Hooks:
    """How ``fit`` reports and is stopped; none of it changes what is trained."""

    epoch_end: EpochCallback | None = None
    checkpoint: Callable[[TrainingState], None] | None = None  # every train.checkpoint_every epochs
    should_stop: Callable[[], bool] | None = None  # polled after every step: True raises TrainingInterrupted
    progress: bool = False  # a line per epoch
    progress_bar: bool = False  # and a per-step bar


@dataclass
class Training:
    """What one ``fit`` owns: the model and its optimisation, the loader, the record so far.

    The loop in ``fit`` reads as its steps; each training feature (DDP, EMA, Lookahead, stem
    freezing, low-resolution epochs, resuming) is a few lines in one of them.
    """

    cfg: ExperimentConfig
    device: torch.device
    model: nn.Module
    loader: DeviceLoader
    val_images: torch.Tensor
    val_labels: np.ndarray
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: torch.optim.swa_utils.AveragedModel | None
    lookahead: Lookahead | None
    horizon: Horizon  # the schedule's length, which a deadline can move
    rank: int = 0
    world: int = 1
    step_model: nn.Module | None = None  # the model as trained: DDP-wrapped and compiled where asked
    wrappers: dict[tuple[bool, ...], nn.Module] = field(default_factory=dict)  # one per trainable set
    result: FitResult = field(default_factory=FitResult)
    best_state: dict[str, torch.Tensor] | None = None
    started: float = 0.0

    @property
    def epochs(self) -> int:
        """The last epoch as planned now (a deadline moves it; the recipe keeps what was asked)."""
        return self.horizon.total_steps // len(self.loader)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def wrap(self) -> None:
        """DDP across ranks, then torch.compile if asked: one wrapper per trainable set (the stem
        learning or frozen), built when first needed and kept, so its compiled graphs are too."""
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable not in self.wrappers:
            step_model = self.model
            if self.world > 1:  # DDP fixes at construction which parameters send gradients
                ids = [self.device.index] if self.device.type == "cuda" else None
                step_model = DistributedDataParallel(self.model, device_ids=ids)
            self.wrappers[trainable] = torch.compile(step_model) if self.cfg.train.compile else step_model
        self.step_model = self.wrappers[trainable]

    def train_on(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step on this rank's rows of a global batch: (loss, logits, labels used).

        Every rank draws the same global batch (order and augmentation from the shared seed) and
        keeps its own rows: the run matches a single process with that batch.
        """
        if self.world > 1:
            x, y = x[self.rank :: self.world], y[self.rank :: self.world]
        t = self.cfg.train
        loss, logits = train_step(self.step_model, self.optimizer, x, y, amp=t.amp, label_smoothing=t.label_smoothing)
        return loss, logits, y

    def snapshot(self, epoch: int, step: int, sums: torch.Tensor, seen: int) -> TrainingState:
        self.result.train_seconds = time.perf_counter() - self.started
        state = capture_state(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
            lookahead=self.lookahead, best_state=self.best_state, result=self.result,
            epoch=epoch, step=step, sums=sums, seen=seen,
        )  # fmt: skip
        state.info["horizon"] = self.horizon.as_dict()  # a moved end stays moved when resumed
        return state

    def set_epochs(self, epochs: int) -> None:
        """End after ``epochs`` instead, from the step reached (the schedule does not jump)."""
        self.horizon.move(self.scheduler.last_epoch, max(1, epochs * len(self.loader)))


@dataclass
class EpochSums:
    """Running training sums of an epoch (this rank's share until ``all_reduce``)."""

    loss: torch.Tensor
    correct: torch.Tensor
    seen: int = 0

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.loss, self.correct])


def prepare_training(model: nn.Module, data, cfg: ExperimentConfig, device, *, fresh: bool = True) -> Training:
    """Model on the device, the shuffling loader, optimizer, schedule, EMA and Lookahead as the recipe asks.

    ``data``: the training and validation splits (``images``/``labels`` by split, as the cache holds them).

    ``fresh`` (not resuming): a model with a data-dependent stem (fastnet's whitening) fits it to
    the training images first, before EMA and Lookahead copy the weights.
    """
    t = cfg.train
    if t.whiten_bias_epochs and not getattr(model, "can_freeze_stem", False):
        raise CifarError(
            f"train.whiten_bias_epochs needs a model with a whitening stem (fastnet); {cfg.model.name} has none: "
            "set it to 0."
        )  # checked before training, not after its first epochs
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = DeviceLoader(
        data.images["train"], data.labels["train"], t.batch_size, device,
        augmentation=Augmentation.from_config(cfg.augment), shuffle=True, drop_last=True, seed=t.seed,
        channels_last=t.channels_last,
    )  # fmt: skip
    if fresh and hasattr(model, "init_from_data"):
        spread = torch.linspace(0, len(loader.images) - 1, min(5000, len(loader.images)), device=device).long()
        model.init_from_data(loader.images[spread].float().div(255))  # every class, whatever the storage order
    rank, world = distributed_rank_world()
    if t.batch_size % world:
        raise CifarError(f"train.batch_size {t.batch_size} must divide among {world} processes; pick a multiple.")
    optimizer = build_optimizer(model, cfg, device)
    horizon = Horizon(max(1, t.epochs * len(loader)))
    factor = lr_factor(cfg.schedule.name, cfg.schedule.warmup_fraction, cfg.schedule.final_lr_fraction)
    ema = None
    if t.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay), use_buffers=True
        )
    return Training(
        cfg, device, model, loader, images_to_tensor(data.images["val"], device), np.asarray(data.labels["val"]),
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(horizon.progress(step))), ema,
        Lookahead(model) if t.lookahead else None, horizon, rank, world,
    )  # fmt: skip


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (each first compile and recompile)."""
    from torch._dynamo.utils import counters  # lazy: torch._dynamo takes seconds; only compiled runs need it

    return int(counters["stats"]["unique_graphs"])


def warm_up_compile(run: Training, first_epoch: int = 1, *, force: bool = False) -> None:
    """Compile before the clock starts. torch.compile builds a graph at first use and again for
    each new input size and trainable set, so one step runs in every state the epochs from
    ``first_epoch`` will visit (low resolution, full resolution, stem frozen); then the weights,
    optimizer, schedule, averages and the stem's trainability are put back as they were
    (``force``: the same without train.compile)."""
    t = run.cfg.train
    if not (t.compile or force):
        return
    parts = {"model": run.model, "optimizer": run.optimizer, "scheduler": run.scheduler, "ema": run.ema,
             "lookahead": run.lookahead}  # fmt: skip
    saved = {name: copy.deepcopy(part.state_dict()) for name, part in parts.items() if part is not None}
    trainable = [p.requires_grad for p in run.model.parameters()]
    states = {first_epoch, max(first_epoch, t.low_res_epochs + 1), max(first_epoch, t.whiten_bias_epochs + 1)}
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        for epoch in sorted(e for e in states if e <= run.epochs):
            begin_epoch(run, epoch)
            x, y = next(iter(run.loader))
            run.train_on(x, y)[0].item()
    for name, state in saved.items():
        parts[name].load_state_dict(state)
    for p, grad in zip(run.model.parameters(), trainable, strict=True):
        p.requires_grad_(grad)
    run.wrap()


def resume_training(run: Training, state: TrainingState) -> tuple[int, int, EpochSums | None]:
    """Load a captured state; returns (epoch, step to continue from, that epoch's sums so far)."""
    restored = restore_state(
        state, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, ema=run.ema,
        lookahead=run.lookahead, device=run.device,
    )  # fmt: skip
    run.best_state = restored["best_state"]
    if "horizon" in state.info:
        run.horizon.load(state.info["horizon"])
    run.result.history = [EpochMetrics(**m) for m in state.info["history"]]
    run.result.best_epoch, run.result.best_val_accuracy = state.info["best_epoch"], state.info["best_val_accuracy"]
    sums = restored["sums"]
    partial = EpochSums(sums[0].clone(), sums[1].clone(), state.info["seen"]) if sums is not None else None
    return state.epoch, state.step, partial


def begin_epoch(run: Training, epoch: int) -> None:
    """The epoch's batches (order, augmentation), its resolution, and the stem freezing on schedule."""
    t = run.cfg.train
    run.loader.set_epoch(epoch)
    run.loader.image_size = t.low_res if epoch <= t.low_res_epochs else None
    run.model.train()
    if 0 < t.whiten_bias_epochs < epoch and run.model.freeze_stem():
        run.wrap()  # DDP must not wait for gradients the stem no longer has


def train_one_epoch(
    run: Training,
    epoch: int,
    hooks: Hooks = Hooks(),
    deadline: Deadline | None = None,
    *,
    skip: int = 0,
    sums: EpochSums | None = None,
) -> EpochSums:
    """Every step of one epoch (the first ``skip`` batches are drawn, not trained: resuming mid-epoch).

    With a ``deadline``, halfway through the planned last epoch the plan may grow (``stretch_last_epoch``).
    """
    sums = sums or EpochSums(torch.zeros((), device=run.device), torch.zeros((), device=run.device))
    start = time.perf_counter()
    show_bar = hooks.progress and hooks.progress_bar
    bar = tqdm(run.loader, desc=f"epoch {epoch}/{run.epochs}", unit="batch", leave=False, disable=not show_bar,
               mininterval=1.0)  # fmt: skip
    for step, (x, y) in enumerate(bar):
        if step < skip:  # the same generator state as the interrupted run: draw, do not train
            continue
        loss, logits, y = run.train_on(x, y)
        run.scheduler.step()
        if run.lookahead is not None:
            done = (epoch - 1) * len(run.loader) + step + 1
            run.lookahead.step(done, run.horizon.progress(done))
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        sums.loss += loss.detach() * len(y)
        sums.correct += (logits.argmax(1) == y).sum()
        sums.seen += len(y)
        if show_bar and step % 10 == 0:  # .item() syncs the GPU: not every step
            rate = sums.seen / max(1e-9, time.perf_counter() - start)
            bar.set_postfix(
                loss=f"{loss.item():.3f}", acc=f"{(sums.correct / sums.seen).item():.3f}", img_s=f"{rate:.0f}"
            )
        halfway = step + 1 == max(skip + 1, len(run.loader) // 2)
        if deadline is not None and halfway and epoch == run.epochs:
            stretch_last_epoch(run, epoch, step + 1 - skip, start, deadline)
        if hooks.should_stop is not None and stop_agreed(run, hooks.should_stop, step):
            raise TrainingInterrupted(run.snapshot(epoch, step + 1, sums.stacked(), sums.seen))
    return sums


def stop_agreed(run: Training, should_stop: Callable[[], bool], step: int) -> bool:
    """Whether to stop after this step. Under DDP the ranks vote together (any request stops all),
    every STOP_VOTE_EVERY steps and at an epoch's end, so they stop at the same step: a rank
    stopping alone would leave the others waiting in a collective."""
    if run.world == 1:
        return should_stop()
    if (step + 1) % STOP_VOTE_EVERY and step + 1 < len(run.loader):
        return False
    vote = torch.tensor([float(should_stop())], device=run.device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def end_epoch(run: Training, epoch: int, sums: EpochSums, epoch_start: float) -> EpochMetrics:
    """All ranks' sums, the divergence check, validation, and the best epoch so far (its weights kept)."""
    t = run.cfg.train
    seen = torch.tensor(float(sums.seen), device=run.device)
    if run.world > 1:
        for total in (sums.loss, sums.correct, seen):
            dist.all_reduce(total)
    train_loss = (sums.loss / seen.clamp(min=1)).item()
    if not math.isfinite(train_loss):
        raise CifarError(
            f"training diverged at epoch {epoch} (loss {train_loss}); lower optim.lr and try again "
            "(the last checkpoint, if any, holds the last finite epoch)."
        )
    if run.lookahead is not None and epoch == run.epochs:
        run.lookahead.finish()
    train_time = time.perf_counter() - epoch_start
    val = None
    if epoch == run.epochs or (t.eval_every and epoch % t.eval_every == 0):
        val = evaluate(
            run.eval_model, run.val_images, run.val_labels, device=run.device, batch_size=t.eval_batch_size,
            tta=t.tta, tta_translate=t.tta_translate, amp=t.amp, channels_last=t.channels_last,
        )  # fmt: skip
    metrics = EpochMetrics(
        epoch=epoch,
        train_loss=train_loss,
        train_accuracy=(sums.correct / seen.clamp(min=1)).item(),
        val_loss=val.loss if val else None,
        val_accuracy=val.accuracy if val else None,
        learning_rate=run.optimizer.param_groups[0]["lr"],
        images_per_second=seen.item() / max(1e-9, train_time),
        epoch_seconds=time.perf_counter() - epoch_start,
    )
    run.result.history.append(metrics)
    if val is not None and (val.accuracy > run.result.best_val_accuracy or run.best_state is None):
        run.result.best_epoch, run.result.best_val_accuracy = epoch, val.accuracy
        run.best_state = copy.deepcopy(run.eval_model.state_dict())
    return metrics


def after_epoch(run: Training, metrics: EpochMetrics, hooks: Hooks, deadline: Deadline | None) -> None:
    """The epoch's line and hook, the deadline kept, and a checkpoint when one is due."""
    epoch, t = metrics.epoch, run.cfg.train
    if hooks.progress:
        val = "" if metrics.val_loss is None else f"val loss {metrics.val_loss:.4f} "
        val += "" if metrics.val_accuracy is None else f"acc {metrics.val_accuracy:.4f}  "
        tqdm.write(
            f"epoch {epoch:>3}/{run.epochs}  train loss {metrics.train_loss:.4f} acc {metrics.train_accuracy:.4f}  "
            f"{val}{metrics.images_per_second:,.0f} img/s  {metrics.epoch_seconds:.1f} s"
        )
    if hooks.epoch_end is not None:
        hooks.epoch_end(metrics)
    if deadline is not None and keep_deadline(run, epoch, deadline) and hooks.progress:
        tqdm.write(f"Time budget: {run.result.replans[-1]}")
    if hooks.checkpoint is not None and t.checkpoint_every and (epoch % t.checkpoint_every == 0 or epoch == run.epochs):
        hooks.checkpoint(run.snapshot(epoch + 1, 0, torch.zeros(2, device=run.device), 0))


def fit(
    model: nn.Module,
    data,
    cfg: ExperimentConfig,
    device: torch.device,
    *,
    hooks: Hooks = Hooks(),
    resume: TrainingState | None = None,
    deadline: Deadline | None = None,
) -> FitResult:
    """Train ``model`` on ``data``'s train split in place; leave it holding the best validation epoch's weights.

    ``resume`` continues from a captured state (same batches, same augmentation: on CPU in
    deterministic mode the final weights are bit-identical to an uninterrupted run). ``deadline``
    (a time budget's): the last epoch moves so that training ends by it; ``FitResult.replans``
    says when and why.
    """
    run = prepare_training(model, data, cfg, device, fresh=resume is None)
    first, skip, partial = resume_training(run, resume) if resume is not None else (1, 0, None)
    run.wrap()
    tick = time.perf_counter()
    warm_up_compile(run, first)
    run.result.compile_seconds = time.perf_counter() - tick
    graphs = compiled_graphs() if cfg.train.compile else 0  # torch._dynamo takes seconds to import: only when compiling
    run.started = time.perf_counter()
    epoch = first
    while epoch <= run.epochs:  # a deadline can move the last epoch
        begin_epoch(run, epoch)
        epoch_start = time.perf_counter()
        resumed = {"skip": skip, "sums": partial} if epoch == first and skip > 0 else {}
        sums = train_one_epoch(run, epoch, hooks, deadline, **resumed)
        after_epoch(run, end_epoch(run, epoch, sums, epoch_start), hooks, deadline)
        epoch += 1
    run.result.train_seconds = time.perf_counter() - run.started
    if cfg.train.compile:  # graphs built inside the timed loop: 0 when the warm-up saw every state
        run.result.recompiles = compiled_graphs() - graphs
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    return run.result

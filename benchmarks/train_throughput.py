"""Training images/s: this project's pipeline against a conventional torchvision one, same run.

    python benchmarks/train_throughput.py [--experiment cpu] [--quick]

Project: the cache (decoded once) moved to the device as uint8, batches gathered and augmented
there with tensor ops (``DeviceLoader`` + ``augment_batch``).
Conventional: ``torchvision.datasets.ImageFolder`` over the JPEG files + ``transforms``
(RandomCrop with padding, RandomHorizontalFlip, ToTensor) + ``DataLoader(num_workers=2)``.
Both feed the same model, optimizer, batch size, precision and device through
``engine.train_step``; each is timed over the same number of steps after warm-up steps, both with
the model (training throughput) and without it (what the input pipeline alone can deliver).
For ``fastnet`` the full mode also times the project's steps once the whitening stem is frozen (after
``train.whiten_bias_epochs``: backward then skips the first conv's input gradient), alternating
rounds of both so that a drifting machine speed affects them alike. ``--compile`` adds the same
alternating comparison of the eager steps against ``torch.compile``'d ones (compiled first, untimed).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _common import DEFAULT_ARCHIVE, extract_imagefolder, machine_name, record


def timed_steps(batches: Iterator, steps: int, warmup: int, step_fn) -> float:
    """Images/s over ``steps`` batches after ``warmup`` batches."""
    import torch

    for _ in range(warmup):
        step_fn(*next(batches))
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(batches)
        step_fn(x, y)
        seen += len(y)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def forever(make_iter) -> Iterator:
    while True:
        yield from make_iter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="the JPEG archive (ImageFolder inside)")
    p.add_argument("--data-dir", type=Path, help="the project cache (default: data/)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer steps and images (under 2 minutes on 2 cores)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps against eager ones")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()

    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from cifar.config import load_experiment
    from cifar.data import ensure_cache
    from cifar.data.loader import Augmentation, DeviceLoader
    from cifar.engine import native_bf16, resolve_device, train_step
    from cifar.engine.optim import build_optimizer
    from cifar.models import create_model

    cfg = load_experiment(args.experiment, args.overrides)
    t, aug = cfg.train, cfg.augment
    device = resolve_device(args.device)
    steps, warmup = (8, 2) if args.quick else (args.steps, 5)
    per_class = max(1, (steps + warmup) * t.batch_size // 10 + 1)  # enough files for one pass

    data = ensure_cache(args.data_dir, str(args.archive))
    project = DeviceLoader(
        data.images["train"][: per_class * 10],
        data.labels["train"][: per_class * 10],
        t.batch_size,
        device,
        augmentation=Augmentation.from_config(aug),
        shuffle=True,
        drop_last=True,
        channels_last=t.channels_last,
    )
    tmp = tempfile.TemporaryDirectory(prefix="throughput-")
    folder = extract_imagefolder(args.archive, Path(tmp.name), "train", per_class)
    preset = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=aug.translate, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    conventional = DataLoader(
        datasets.ImageFolder(folder, preset),
        batch_size=t.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )

    def to_device(loader):
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(device, non_blocking=True)

    model = create_model(cfg.model.name, width=cfg.model.width, mean=data.mean, std=data.std).to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, device)

    def step(x, y):
        train_step(model, optimizer, x, y, amp=t.amp, label_smoothing=t.label_smoothing)

    def no_model(x, y):
        pass

    frozen_step = None
    if hasattr(model, "freeze_stem") and not args.quick:  # a few steps cannot resolve ~10%: full mode only
        frozen_model = copy.deepcopy(model)
        frozen_model.freeze_stem()
        frozen_optimizer = build_optimizer(frozen_model, cfg, device)

        def frozen_step(x, y):
            train_step(frozen_model, frozen_optimizer, x, y, amp=t.amp, label_smoothing=t.label_smoothing)

    compiled_step = None
    if args.compile:
        compiled_model = copy.deepcopy(model)
        compiled_optimizer, compiled = build_optimizer(compiled_model, cfg, device), torch.compile(compiled_model)

        def compiled_step(x, y):
            train_step(compiled, compiled_optimizer, x, y, amp=t.amp, label_smoothing=t.label_smoothing)

    figures = {}
    for pipeline, make in (("project", lambda: iter(project)), ("conventional", lambda: to_device(conventional))):
        figures[pipeline, "input only"] = timed_steps(forever(make), steps, warmup, no_model)
        figures[pipeline, "training"] = timed_steps(forever(make), steps, warmup, step)
    tmp.cleanup()
    if frozen_step is not None:
        rounds, learning, frozen = 4, [], []
        for _ in range(rounds):
            learning.append(timed_steps(forever(lambda: iter(project)), steps // 2 // rounds, 1, step))
            frozen.append(timed_steps(forever(lambda: iter(project)), steps // 2 // rounds, 1, frozen_step))
        figures["stem learning"], figures["stem frozen"] = sum(learning) / rounds, sum(frozen) / rounds

    if compiled_step is not None:
        tick = time.perf_counter()
        timed_steps(forever(lambda: iter(project)), 1, 2, compiled_step)  # builds the graphs
        figures["compile seconds"] = time.perf_counter() - tick
        rounds, eager, compiled_rates = 4, [], []
        per_round = max(1, steps // 2 // rounds)
        for _ in range(rounds):
            eager.append(timed_steps(forever(lambda: iter(project)), per_round, 1, step))
            compiled_rates.append(timed_steps(forever(lambda: iter(project)), per_round, 1, compiled_step))
        figures["eager"], figures["compiled"] = sum(eager) / rounds, sum(compiled_rates) / rounds

    machine = machine_name(str(device))
    setting = (
        f"`{cfg.name}` ({cfg.model.name} width {cfg.model.width}, batch {t.batch_size}, "
        f"{'bf16 autocast' if t.amp and native_bf16(device) else 'fp32'}), "
        f"{steps} steps after {warmup} warm-up, {machine}"
    )
    lines = [f"setting: {setting}; conventional = ImageFolder + transforms + DataLoader(num_workers={args.workers})"]
    for kind in ("training", "input only"):
        a, b = figures["project", kind], figures["conventional", kind]
        lines.append(f"{kind}: project {a:,.0f} img/s, conventional {b:,.0f} img/s (ratio {a / b:.2f}x)")
    if "stem frozen" in figures:
        a, b = figures["stem frozen"], figures["stem learning"]
        lines.append(
            f"project training once the whitening stem is frozen: {a:,.0f} img/s vs {b:,.0f} img/s while it "
            f"learns (ratio {a / b:.2f}x, alternating rounds)"
        )
    if "compiled" in figures:
        a, b = figures["compiled"], figures["eager"]
        lines.append(
            f"torch.compile'd training steps: {a:,.0f} img/s vs {b:,.0f} img/s eager (ratio {a / b:.2f}x, "
            f"alternating rounds; compiling took {figures['compile seconds']:.0f} s first)"
        )
    record("train_throughput" + (" (quick)" if args.quick else ""), lines, write=not args.no_results)


if __name__ == "__main__":
    main()

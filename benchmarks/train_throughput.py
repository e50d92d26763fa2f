"""Training images/s: the cache on the device (``DeviceLoader``) against ``ImageFolder`` + transforms +
``DataLoader(num_workers=2)``, same model and device, with and without the model; in alternating rounds, the
whitening stem frozen (full mode) and ``torch.compile``'d steps (``--compile``) against the steps as they are.

    python benchmarks/train_throughput.py [--experiment cpu] [--quick] [--compile]
"""

import copy
import itertools
import tempfile
import time
from pathlib import Path

import torch
from harness import extract_imagefolder, parser, record
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from cifar.config import load_experiment
from cifar.data import ensure_cache
from cifar.data.loader import Augmentation, DeviceLoader
from cifar.engine import native_bf16, resolve_device, train_step
from cifar.engine.models import create_model
from cifar.engine.optim import build_optimizer


def timed_steps(make_batches, steps: int, warmup: int, step_fn) -> float:
    """Images/s over ``steps`` batches after ``warmup`` batches, drawing ``make_batches()`` again as it ends."""
    batches = itertools.chain.from_iterable(iter(make_batches, None))
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


if __name__ == "__main__":
    p = parser(
        __doc__,
        "--experiment",
        "--set",
        "--archive",
        "--data-dir",
        "--device",
        quick="fewer steps and images (under 2 minutes on 2 cores)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps against eager ones")
    args = p.parse_args()
    cfg = load_experiment(args.experiment, args.overrides)
    t, aug, device = cfg.train, cfg.augment, resolve_device(args.device)
    steps, warmup = (8, 2) if args.quick else (40, 5)
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
    preset = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=aug.translate, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    folder = extract_imagefolder(args.archive, Path(tmp.name), "train", per_class)
    conventional = DataLoader(
        datasets.ImageFolder(folder, preset),
        batch_size=t.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=2,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )

    def to_device():
        for x, y in conventional:
            x = x.to(device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last) if t.channels_last else x
            yield x, y.to(device, non_blocking=True)

    def stepper(model, compiled=False):
        optimizer = build_optimizer(model, cfg, device)
        model = torch.compile(model) if compiled else model
        return lambda x, y: train_step(model, optimizer, x, y, amp=t.amp, label_smoothing=t.label_smoothing)

    model = create_model(cfg.model.name, width=cfg.model.width, mean=data.mean, std=data.std).to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    variants = {}
    if hasattr(model, "freeze_stem") and not args.quick:  # a few steps cannot resolve ~10%: full mode only
        variants["stem frozen"] = copy.deepcopy(model)
        variants["stem frozen"].freeze_stem()
    if args.compile:
        variants["compiled"] = copy.deepcopy(model)
    step, variants = stepper(model), {k: stepper(m, k == "compiled") for k, m in variants.items()}
    figures = {
        "model": f"{cfg.model.name} {cfg.model.width}",
        "batch": t.batch_size,
        "steps": steps,
        "precision": "bf16 autocast" if t.amp and native_bf16(device) else "fp32",
    }
    for pipeline, make in (("project", lambda: iter(project)), ("conventional", to_device)):
        figures[f"{pipeline} input only img/s"] = timed_steps(make, steps, warmup, lambda x, y: None)
        figures[f"{pipeline} img/s"] = timed_steps(make, steps, warmup, step)
    tmp.cleanup()
    figures["ratio"] = figures["project img/s"] / figures["conventional img/s"]
    figures["input only ratio"] = figures["project input only img/s"] / figures["conventional input only img/s"]
    for name, other in variants.items():  # against the project's steps, in alternating rounds
        tick = time.perf_counter()
        timed_steps(lambda: iter(project), 1, 2, other)  # warm (compiled: builds the graphs)
        figures |= {"compile s": time.perf_counter() - tick} if name == "compiled" else {}
        rounds, base, rates = 4, [], []
        for _ in range(rounds):
            base.append(timed_steps(lambda: iter(project), max(1, steps // 2 // rounds), 1, step))
            rates.append(timed_steps(lambda: iter(project), max(1, steps // 2 // rounds), 1, other))
        figures[f"{name} img/s"], figures[f"{name} ratio"] = sum(rates) / rounds, sum(rates) / sum(base)
    name = "train_throughput" + (f".{cfg.name}" if args.experiment != "cpu" else "") + ".quick" * args.quick
    record(name, figures, device=str(device), write=not args.no_results)

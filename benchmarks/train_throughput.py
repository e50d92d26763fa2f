"""Training images/s: the cache on the device (``DeviceLoader``) against ``ImageFolder`` + transforms +
``DataLoader(num_workers=2)``, same model and device, with and without the model; in alternating rounds, the
whitening stem frozen (full mode) and ``torch.compile``'d steps (``--compile``) against the steps as they are.

    python benchmarks/train_throughput.py [--experiment cpu] [--quick] [--compile]
"""

import copy
import itertools
import tempfile
from pathlib import Path

import torch
from harness import config, extract_imagefolder, parser, record, timed
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import Compose, RandomCrop, RandomHorizontalFlip, ToTensor

from cifar.data import ensure_cache
from cifar.data.loader import Augmentation, DeviceLoader
from cifar.engine import native_bf16, resolve_device, train_step
from cifar.engine.models import create_model
from cifar.engine.optim import build_optimizer


def rate(make_batches, steps: int, warmup: int, step) -> float:
    """Images/s of ``step`` over ``steps`` batches after ``warmup`` ones, drawing ``make_batches()`` anew as it ends."""
    batches = itertools.chain.from_iterable(iter(make_batches, None))
    for x, y in itertools.islice(batches, warmup):
        step(x, y)
    done, seconds = timed(lambda: [(step(x, y), len(y)) for x, y in itertools.islice(batches, steps)])
    return sum(images for _, images in done) / seconds


if __name__ == "__main__":
    p = parser(__doc__, "experiment set archive data-dir device", quick="fewer steps and images")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps against eager ones")
    args = p.parse_args()
    cfg, device = config(args, args.experiment, args.overrides), resolve_device(args.device)
    t, aug, (steps, warmup) = cfg.train, cfg.augment, (8, 2) if args.quick else (40, 5)
    layout = torch.channels_last if t.channels_last else torch.preserve_format
    n = 10 * (per_class := (steps + warmup) * t.batch_size // 10 + 1)  # enough files for one pass
    data = ensure_cache(args.data_dir, str(args.archive))
    images, labels = data.images["train"][:n], data.labels["train"][:n]
    project = DeviceLoader(images, labels, t.batch_size, device, augmentation=Augmentation.from_config(aug),
                           shuffle=True, drop_last=True, channels_last=t.channels_last)  # fmt: skip
    tmp = tempfile.TemporaryDirectory(prefix="throughput-")
    preset = Compose([RandomCrop(32, aug.translate, padding_mode="reflect"), RandomHorizontalFlip(), ToTensor()])
    folder = datasets.ImageFolder(extract_imagefolder(args.archive, Path(tmp.name), "train", per_class), preset)
    conventional = DataLoader(folder, t.batch_size, shuffle=True, drop_last=True, num_workers=2,
                              pin_memory=device.type == "cuda", persistent_workers=True)  # fmt: skip

    def to_device():
        for x, y in conventional:
            yield x.to(device, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)

    def stepper(model, compiled=False):
        optimizer = build_optimizer(model, cfg, device)
        model = torch.compile(model) if compiled else model
        return lambda x, y: train_step(model, optimizer, x, y, amp=t.amp, label_smoothing=t.label_smoothing)

    model = create_model(cfg.model.name, width=cfg.model.width, mean=data.mean, std=data.std)
    model, variants = model.to(device, memory_format=layout), {}
    if hasattr(model, "freeze_stem") and not args.quick:  # a few steps cannot resolve ~10%: full mode only
        variants["stem frozen"] = copy.deepcopy(model)
        variants["stem frozen"].freeze_stem()
    variants |= {"compiled": copy.deepcopy(model)} if args.compile else {}
    step, variants = stepper(model), {k: stepper(m, k == "compiled") for k, m in variants.items()}
    batches = project.__iter__  # a fresh pass over the project's loader at each call
    figures = {"model": f"{cfg.model.name} {cfg.model.width}", "batch": t.batch_size, "steps": steps}
    figures["precision"] = "bf16 autocast" if t.amp and native_bf16(device) else "fp32"
    for pipeline, make in (("project", batches), ("conventional", to_device)):
        figures[f"{pipeline} input only img/s"] = rate(make, steps, warmup, lambda x, y: None)
        figures[f"{pipeline} img/s"] = rate(make, steps, warmup, step)
    tmp.cleanup()
    figures["ratio"] = figures["project img/s"] / figures["conventional img/s"]
    figures["input only ratio"] = figures["project input only img/s"] / figures["conventional input only img/s"]
    rounds, few = 4, max(1, steps // 8)  # steps per round and side
    for name, other in variants.items():  # against the project's steps, in alternating rounds
        _, warm = timed(rate, batches, 1, 2, other)  # compiled: builds the graphs
        figures |= {"compile s": warm} if name == "compiled" else {}
        base, rates = zip(*[(rate(batches, few, 1, step), rate(batches, few, 1, other)) for _ in range(rounds)])
        figures[f"{name} img/s"], figures[f"{name} ratio"] = sum(rates) / rounds, sum(rates) / sum(base)
    name = "train_throughput" + (f".{cfg.name}" if args.experiment != "cpu" else "") + ".quick" * args.quick
    record(name, figures, args)

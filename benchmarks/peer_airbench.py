"""The peer, side by side: airbench (PyPI ``airbench==0.1.8``) against the project's recipes.

    python benchmarks/peer_airbench.py --seeds 3                  # CUDA: airbench94 vs speedrun, airbench96 vs best
    python benchmarks/peer_airbench.py --pair 94=cpu --peer-epochs 2 3.8 --project-epochs 3 6   # a CPU curve
    python benchmarks/peer_airbench.py --quick                    # 4,000 images, 1 epoch each: checks the harness

Both sides read the project's prepared cache and are timed by the same clock on the same device,
one after the other in this process, seed by seed:
- airbench: wall seconds around its own ``train94``/``train96`` call (whitening set-up included,
  as its own timer does; with ``verbose=False`` it evaluates nothing inside). It trains on
  train+val (50,000 images, its design: a fixed epoch count, no validation) or, with
  ``--peer-train train``, on the project's 45,000;
- the project: the engine's training clock (``fit.train_seconds``) with ``train.eval_every=0``, so
  the one validation pass that picks the kept epoch is on it and no other.
Test accuracy is on the same 10,000 test images, each side with its own test-time augmentation
(airbench: ``tta_level`` 2, mirror + translate; a recipe: its own ``train.tta``/``train.tta_translate``,
for ``cpu`` the same mirror + translate 1 pixel).

On CUDA airbench runs unchanged. On a CPU it gets the smallest change that runs there, all of it
in ``cpu_adaptation``: modules stay on the CPU in fp32 (its ``.cuda()``/``.half()`` do nothing),
its loader keeps float32 images on the CPU, its CUDA timing events become wall-clock ones, and
training runs under bf16 autocast where the CPU has native bf16 (fp32 otherwise, as the recipes do),
except the whitening statistics, which stay fp32 as on CUDA (in bf16 the eigendecomposition fails).

Each ``--peer-epochs`` / ``--project-epochs`` value is a whole run with its own schedule; together
they trace accuracy against time, from which the time each side needs to reach the other's
accuracy is read (linear between measured points; a bound where the other's accuracy lies outside
the measured range). Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from _common import machine_name, record
from torch import nn

from cifar.config import load_experiment
from cifar.data import ensure_cache
from cifar.data.cache import CifarData
from cifar.engine import device_kind, native_bf16
from cifar.run.training import TrainOptions, train_experiment

PEERS = ("94", "96")
GPU_PAIRS = ("94=speedrun", "96=best")
CPU_PAIRS = ("94=cpu",)


@dataclass(frozen=True)
class Point:
    """One setting (a system at an epoch count): test accuracy and training seconds over seeds."""

    system: str
    epochs: float
    accuracies: tuple[float, ...]
    seconds: tuple[float, ...]

    @property
    def accuracy(self) -> float:
        return statistics.mean(self.accuracies)

    @property
    def time(self) -> float:
        return statistics.mean(self.seconds)

    def row(self) -> str:
        def spread(values: tuple[float, ...], scale: float, digits: int) -> str:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values) * scale:.{digits}f} ± {std * scale:.{digits}f}"

        return (
            f"| {self.system} | {self.epochs:g} | {len(self.accuracies)} | {spread(self.accuracies, 100, 2)}% "
            f"| {spread(self.seconds, 1, 1)} s |"
        )


def time_to_reach(points: list[Point], accuracy: float) -> tuple[str, float | None]:
    """Seconds the curve ``points`` needs to reach ``accuracy``: ('=', s), ('<=', s), or ('>', longest s)."""
    curve = sorted(points, key=lambda p: p.time)
    if curve[0].accuracy >= accuracy:
        return "<=", curve[0].time
    for a, b in zip(curve, curve[1:], strict=False):
        if a.accuracy < accuracy <= b.accuracy:
            return "=", a.time + (accuracy - a.accuracy) / (b.accuracy - a.accuracy) * (b.time - a.time)
    return ">", curve[-1].time


def ratio_lines(peer: list[Point], project: list[Point]) -> list[str]:
    """For each setting of one side: how long the other side needs for its accuracy, as a ratio."""
    lines = []
    for mine, theirs in ((peer, project), (project, peer)):
        for p in mine:
            how, seconds = time_to_reach(theirs, p.accuracy)
            other = theirs[0].system
            if how == ">":
                lines.append(
                    f"{other} does not reach {p.system}'s {p.accuracy:.2%} ({p.epochs:g} epochs, {p.time:.1f} s) "
                    f"within its longest measured run ({seconds:.1f} s): ratio > {seconds / p.time:.2f}x"
                )
            else:
                sign = "=" if how == "=" else "<="
                lines.append(
                    f"{other} needs {sign} {seconds:.1f} s for {p.system}'s {p.accuracy:.2%} ({p.epochs:g} epochs, "
                    f"{p.time:.1f} s): time ratio {other}/{p.system} {sign} {seconds / p.time:.2f}x"
                )
    return lines


class _WallEvent:
    """``torch.cuda.Event(enable_timing=True)`` on a CPU: a wall-clock mark."""

    def __init__(self, **_: object) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: _WallEvent) -> float:
        return (end.at - self.at) * 1000.0


@contextlib.contextmanager
def cpu_adaptation(bf16: bool):
    """airbench on a CPU: the device and bf16 autocast with fp32 weights, nothing else changed."""
    import airbench.utils

    class CpuCifarLoader(airbench.utils.CifarLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "gpu": "cpu"})
            self.images = self.images.float()  # fp16 arithmetic on a CPU is emulated: slow

    def whitening_in_fp32(layer, train_set, **kwargs):  # as on CUDA, where it casts to fp32 itself
        with torch.autocast("cpu", enabled=False):
            return init_whitening(layer, train_set, **kwargs)

    init_whitening = airbench.utils.init_whitening_conv
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(airbench.utils, "CifarLoader", CpuCifarLoader))
        stack.enter_context(mock.patch.object(airbench.utils, "init_whitening_conv", whitening_in_fp32))
        stack.enter_context(mock.patch.object(nn.Module, "cuda", lambda self, *a, **k: self))
        stack.enter_context(mock.patch.object(nn.Module, "half", lambda self: self))
        stack.enter_context(mock.patch.object(torch.cuda, "Event", _WallEvent))
        stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
        # one autocast region spans its whole loop: without the cast cache each step sees the new weights
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False))
        yield CpuCifarLoader


def write_airbench_files(data: CifarData, folder: Path, peer_train: str) -> Path:
    """The cache as airbench reads it: ``cifar10/{train,test}.pt`` of NHWC uint8 images and labels."""
    root = folder / "cifar10"
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": ("train", "val") if peer_train == "train+val" else ("train",), "test": ("test",)}
    for name, parts in splits.items():
        images = torch.cat([torch.from_numpy(data.images[p][:].copy()) for p in parts])
        labels = torch.cat([torch.from_numpy(data.labels[p].astype("int64")) for p in parts])
        torch.save({"images": images, "labels": labels, "classes": list(data.classes)}, root / f"{name}.pt")
    return root


def run_airbench(peer: str, epochs: float, seed: int, root: Path, device: torch.device) -> tuple[float, float]:
    """(test accuracy with its own TTA, training seconds) of one airbench run."""
    import airbench
    import airbench.utils

    lib = {"94": airbench.lib_airbench94, "96": airbench.lib_airbench96}[peer]
    train = {"94": airbench.train94, "96": airbench.train96}[peer]
    tta = lib.hyp["net"]["tta_level"]
    on_cpu = device.type == "cpu"
    adapt = cpu_adaptation(native_bf16(device)) if on_cpu else contextlib.nullcontext(airbench.utils.CifarLoader)
    with adapt as loader_cls, contextlib.chdir(root.parent):  # its test loader opens ./cifar10/test.pt
        gpu = "cpu" if on_cpu else (device.index or 0)
        loader = loader_cls("cifar10", train=True, batch_size=lib.hyp["opt"]["batch_size"], aug=lib.hyp["aug"],
                            altflip=True, gpu=gpu)  # fmt: skip
        test = loader_cls("cifar10", train=False, batch_size=2000, gpu=gpu)
        torch.manual_seed(seed)
        if not on_cpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model = train(loader, epochs=epochs, verbose=False)
        if not on_cpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        accuracy = airbench.evaluate(model, test, tta_level=tta)
    return accuracy, seconds


def run_project(experiment: str, epochs: float, seed: int, overrides: list[str], options: TrainOptions):
    """(test accuracy with the recipe's TTA, the engine's training seconds) of one recipe run."""
    kind = device_kind(torch.device(options.device))  # the recipe as it trains on this machine
    cfg = load_experiment(
        experiment, [*overrides, f"train.epochs={int(epochs)}", f"train.seed={seed}", "train.eval_every=0"], kind
    )
    out = train_experiment(cfg, options)
    return out.test.accuracy, out.fit.train_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", action="append", help="PEER=EXPERIMENT, PEER one of 94, 96 (default: by device)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--peer-epochs", type=float, nargs="+", help="airbench epoch counts (default: its own)")
    p.add_argument("--project-epochs", type=int, nargs="+", help="recipe epoch counts (default: the recipe's)")
    p.add_argument("--peer-train", choices=("train+val", "train"), default="train+val")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--quick", action="store_true", help="4,000 training images, 1 epoch each: checks the harness")
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    pairs = []
    for pair in args.pair or (GPU_PAIRS if device.type == "cuda" else CPU_PAIRS):
        peer, _, experiment = pair.partition("=")
        if peer not in PEERS or not experiment:
            p.error(f"--pair expects PEER=EXPERIMENT, PEER one of {', '.join(PEERS)} (e.g. 94=cpu); got '{pair}'")
        pairs.append((peer, experiment))
    data = ensure_cache(args.data_dir)
    if args.quick:
        data = data.subset(4000)
        args.overrides = ["data.subset=4000", *args.overrides]
        args.peer_epochs, args.project_epochs = args.peer_epochs or [1.0], args.project_epochs or [1]
    options = TrainOptions(data_dir=args.data_dir, device=str(device), track=False, progress=False)

    lines = [f"machine: {machine_name(device.type)}; airbench trains on {args.peer_train} ({args.seeds} seed(s))"]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_airbench_files(data, Path(tmp), args.peer_train)
        for peer, experiment in pairs:
            import airbench

            lib = {"94": airbench.lib_airbench94, "96": airbench.lib_airbench96}[peer]
            recipe = load_experiment(experiment, args.overrides, device_kind(device))
            peer_epochs = args.peer_epochs or [lib.hyp["opt"]["train_epochs"]]
            project_epochs = args.project_epochs or [recipe.train.epochs]
            run_airbench(peer, 0.05, 0, root, device)  # warm-up: allocation, kernel choice
            run_project(experiment, 1, 0, [*args.overrides, "data.subset=2000"], options)
            peer_points, project_points = [], []
            for epochs in peer_epochs:
                runs = [run_airbench(peer, epochs, seed, root, device) for seed in range(args.seeds)]
                peer_points.append(Point(f"airbench{peer}", epochs, *map(tuple, zip(*runs, strict=True))))
                print(peer_points[-1].row(), flush=True)
            for epochs in project_epochs:
                runs = [run_project(experiment, epochs, seed, args.overrides, options) for seed in range(args.seeds)]
                project_points.append(Point(experiment, epochs, *map(tuple, zip(*runs, strict=True))))
                print(project_points[-1].row(), flush=True)
            lines += [
                f"airbench{peer} against `{experiment}`"
                + (f" (with {' '.join(args.overrides)})" if args.overrides else "") + ":",
                "", "| system | epochs | seeds | test accuracy | training time |", "|---|---|---|---|---|",
                *(pt.row() for pt in peer_points + project_points), "",
                *ratio_lines(peer_points, project_points),
            ]  # fmt: skip
    record("peer_airbench", lines, write=not args.no_results)


if __name__ == "__main__":
    main()

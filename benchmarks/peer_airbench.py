"""The peer, side by side: airbench (PyPI ``airbench==0.1.8``) against the project's recipes on one cache, clock
and device, seed by seed, each epoch count a whole run; the time each needs for the other's accuracy. On a CPU
airbench runs with the smallest change that runs it there (``cpu_adaptation``).

    python benchmarks/peer_airbench.py --seeds 3                  # CUDA: airbench94 vs speedrun, airbench96 vs best
    python benchmarks/peer_airbench.py --pair 94=cpu --peer-epochs 2 3.8 --project-epochs 3 6   # a CPU curve
    python benchmarks/peer_airbench.py --quick                    # 4,000 images, 1 epoch each: checks the harness
"""

import contextlib
import statistics
import tempfile
from functools import partial
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch
from harness import config, parser, record, spread, timed, train
from torch import nn

from cifar.data import ensure_cache
from cifar.engine import native_bf16, resolve_device

PEERS, GPU_PAIRS, CPU_PAIRS = ("94", "96"), ("94=speedrun", "96=best"), ("94=cpu",)


class Point(NamedTuple):  # one setting (a system at an epoch count): test accuracy and training seconds by seed
    system: str
    epochs: float
    accuracies: tuple[float, ...]
    seconds: tuple[float, ...]
    accuracy = property(lambda self: statistics.mean(self.accuracies))
    time = property(lambda self: statistics.mean(self.seconds))


def time_to_reach(points: list[Point], accuracy: float) -> tuple[str, float]:
    """Seconds the curve ``points`` needs to reach ``accuracy``: ('=', s), ('<=', s), or ('>', longest s)."""
    curve = sorted(points, key=lambda p: p.time)
    if curve[0].accuracy >= accuracy:
        return "<=", curve[0].time
    for a, b in zip(curve, curve[1:]):
        if a.accuracy < accuracy <= b.accuracy:
            return "=", a.time + (accuracy - a.accuracy) / (b.accuracy - a.accuracy) * (b.time - a.time)
    return ">", curve[-1].time


def time_ratio(curve: list[Point], p: Point) -> float | str:
    """The time ``curve`` needs for ``p``'s accuracy as a multiple of ``p``'s ('<= x', '> x' outside the curve)."""
    how, seconds = time_to_reach(curve, p.accuracy)
    return seconds / p.time if how == "=" else f"{how} {seconds / p.time:.2f}"


@contextlib.contextmanager
def cpu_adaptation(bf16: bool):
    """airbench on a CPU: the device, bf16 autocast with fp32 weights (where native), fp32 whitening statistics."""
    import airbench.utils  # lazy: optional (requirements-dev), and importing it turns cudnn.benchmark on

    class CpuCifarLoader(airbench.utils.CifarLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "gpu": "cpu"})
            self.images = self.images.float()  # fp16 arithmetic on a CPU is emulated: slow

    def whitening_in_fp32(layer, train_set, **kwargs):  # as on CUDA, where it casts to fp32 itself
        with torch.autocast("cpu", enabled=False):
            return init_whitening(layer, train_set, **kwargs)

    init_whitening = airbench.utils.init_whitening_conv
    with contextlib.ExitStack() as stack:
        for owner, name, value in (
            (airbench.utils, "CifarLoader", CpuCifarLoader),
            (nn.Module, "half", lambda s: s),
            (airbench.utils, "init_whitening_conv", whitening_in_fp32),
            (nn.Module, "cuda", lambda self, *a, **k: self),
            (torch.cuda, "Event", mock.MagicMock),  # its own clock, unused: ours times the call
            (torch.cuda, "synchronize", lambda *a, **k: None),
        ):
            stack.enter_context(mock.patch.object(owner, name, value))
        # one autocast region spans its whole loop: without the cast cache each step sees the new weights
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False))
        yield CpuCifarLoader


def write_airbench_files(data, folder: Path) -> Path:
    """The cache as airbench reads it, ``cifar10/{train,test}.pt`` of NHWC uint8 images and labels; it trains on
    train+val (its design has no validation split)."""
    (root := folder / "cifar10").mkdir(parents=True, exist_ok=True)
    for name, parts in {"train": ("train", "val"), "test": ("test",)}.items():
        images = torch.cat([torch.from_numpy(data.images[p][:].copy()) for p in parts])
        labels = torch.cat([torch.from_numpy(data.labels[p].astype("int64")) for p in parts])
        torch.save({"images": images, "labels": labels, "classes": list(data.classes)}, root / f"{name}.pt")
    return root


def run_airbench(peer: str, epochs: float, seed: int, root: Path, device: torch.device) -> tuple[float, float]:
    """(test accuracy with its own TTA, training seconds) of one airbench run."""
    import airbench.utils  # lazy: as above

    lib, gpu = getattr(airbench, f"lib_airbench{peer}"), "cpu" if device.type == "cpu" else (device.index or 0)
    adapt = cpu_adaptation(native_bf16(device)) if gpu == "cpu" else contextlib.nullcontext(airbench.utils.CifarLoader)
    with adapt as loader, contextlib.chdir(root.parent):  # its test loader opens ./cifar10/test.pt
        batch, aug = lib.hyp["opt"]["batch_size"], lib.hyp["aug"]
        train_set = loader("cifar10", train=True, batch_size=batch, aug=aug, altflip=True, gpu=gpu)
        test = loader("cifar10", train=False, batch_size=2000, gpu=gpu)
        torch.manual_seed(seed)
        model, seconds = timed(getattr(airbench, f"train{peer}"), train_set, epochs=epochs, verbose=False)
        return airbench.evaluate(model, test, tta_level=lib.hyp["net"]["tta_level"]), seconds


def run_project(args, experiment: str, epochs: float, seed: int, *extra: str) -> tuple[float, float]:
    """(test accuracy with the recipe's TTA, the engine's training seconds) of one recipe run."""
    out = train(args, experiment, [*args.overrides, f"train.epochs={int(epochs)}", f"train.seed={seed}", *extra])[1]
    return out.test.accuracy, out.fit.train_seconds


if __name__ == "__main__":
    import airbench  # only here and in the functions above: optional, and importing it turns cudnn.benchmark on

    p = parser(__doc__, "seeds set device data-dir", quick="4,000 images, 1 epoch each")
    p.add_argument("--pair", action="append", help="PEER=EXPERIMENT, PEER one of 94, 96 (default: by device)")
    p.add_argument("--peer-epochs", type=float, nargs="+", help="airbench epoch counts (default: its own)")
    p.add_argument("--project-epochs", type=int, nargs="+", help="recipe epoch counts (default: the recipe's)")
    args = p.parse_args()
    args.device = str(device := resolve_device(args.device))
    pairs = [pair.split("=", 1) for pair in args.pair or (GPU_PAIRS if device.type == "cuda" else CPU_PAIRS)]
    if any(len(pair) < 2 or pair[0] not in PEERS or not pair[1] for pair in pairs):
        p.error(f"--pair expects PEER=EXPERIMENT, PEER one of {', '.join(PEERS)} (e.g. 94=cpu)")
    data = ensure_cache(args.data_dir)
    if args.quick:
        data, args.overrides = data.subset(4000), ["data.subset=4000", *args.overrides]
        args.peer_epochs, args.project_epochs = args.peer_epochs or [1.0], args.project_epochs or [1]
    args.overrides.append("train.eval_every=0")

    def curve(system: str, epoch_counts: list[float], run) -> list[Point]:
        points = [Point(system, e, *map(tuple, zip(*(run(e, s) for s in range(args.seeds))))) for e in epoch_counts]
        print(*(f"{p.system} {p.epochs:g} epochs: {p.accuracy:.2%} in {p.time:.1f} s" for p in points), sep="\n")
        return points

    with tempfile.TemporaryDirectory() as tmp:
        root = write_airbench_files(data, Path(tmp))
        for peer, experiment in pairs:
            run_airbench(peer, 0.05, 0, root, device)  # warm-up: allocation, kernel choice
            run_project(args, experiment, 1, 0, "data.subset=2000")
            own = [getattr(airbench, f"lib_airbench{peer}").hyp["opt"]["train_epochs"]]
            run = partial(run_airbench, peer, root=root, device=device)
            peers = curve(f"airbench{peer}", args.peer_epochs or own, run)
            recipe = [config(args, experiment, args.overrides).train.epochs]
            ours = curve(experiment, args.project_epochs or recipe, partial(run_project, args, experiment))
            figures = {"airbench trains on": "train+val"}
            for pt, other in [(pt, ours) for pt in peers] + [(pt, peers) for pt in ours]:
                at = f"{pt.system} {pt.epochs:g}"
                figures |= spread(f"{at} epochs %", [100 * a for a in pt.accuracies])
                figures |= spread(f"{at} epochs s", pt.seconds)
                figures[f"{other[0].system} time for {at}-epoch % (x)"] = time_ratio(other, pt)  # for pt's accuracy
            record(f"peer_airbench.{peer}-{experiment}", figures, args)

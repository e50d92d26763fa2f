"""What MLflow tracking costs: the same experiment untracked and tracked, side by side in one run.

    python benchmarks/tracking_overhead.py [--experiment cpu] [--repeats 2] [--quick]

Runs alternate after a one-epoch warm-up, in ABBA order (untracked, tracked, tracked,
untracked, ...), so a steady drift in the machine's speed falls on both sides equally. Two clocks:
the training clock (all epochs, with the per-epoch metric logging and checkpoints inside it) and
the whole ``train_experiment`` call (data, test pass, and for the tracked run: fitting and
exporting the served model, which an untracked run skips as it has nowhere to put it, then run
creation, dataset lineage, evaluation report, figures, weights and the logged model). Tracked
runs go to a temporary SQLite store unless MLFLOW_TRACKING_URI is set.

The difference of two clocks is only as exact as the machine is steady (a shared 2-core machine
drifts by several percent over minutes), so the tracked runs also time the tracking code itself:
the seconds spent in it on the training thread, inside and after the clock, and the CPU seconds
of the background upload.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from _common import machine_name, record


@contextlib.contextmanager
def timing_tracking_code() -> Iterator[dict[str, float]]:
    """Seconds spent in the tracking hooks, by where they run, while the block runs."""
    import cifar.training
    from cifar.tracking.runs import TrainingRun

    seconds: dict[str, float] = defaultdict(float)
    hooks = [  # (owner, attribute, bucket, clock)
        (TrainingRun, "log_epoch", "in_clock", time.perf_counter),
        (cifar.training, "save_checkpoint", "in_clock", time.perf_counter),  # tracked runs only
        (TrainingRun, "push_metrics", "background_cpu", time.thread_time),  # the uploader thread
        (TrainingRun, "__enter__", "after_clock", time.perf_counter),  # run start: before the clock, counted here
        (TrainingRun, "log_data", "after_clock", time.perf_counter),
        (TrainingRun, "log_results", "after_clock", time.perf_counter),
        (TrainingRun, "__exit__", "after_clock", time.perf_counter),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _, _ in hooks]

    def timed(function, bucket, clock):
        def call(*args, **kwargs):
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[bucket] += clock() - start

        return call

    for (owner, name, bucket, clock), (_, _, function) in zip(hooks, originals):
        setattr(owner, name, timed(function, bucket, clock))
    try:
        yield seconds
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", type=Path)
    p.add_argument(
        "--quick",
        action="store_true",
        help="quarter-width model, 5,000 images x 2 epochs, one pair (under 2 minutes on 2 fp32 cores)",
    )
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()

    from cifar.config import load_experiment
    from cifar.training import TrainOptions, train_experiment

    quick = ["model.width=0.25", "data.subset=5000", "train.epochs=2"]
    overrides = [*(quick if args.quick else []), *args.overrides]
    repeats = 1 if args.quick else args.repeats
    tmp = tempfile.TemporaryDirectory(prefix="tracking-overhead-")
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp.name}/mlflow.db"
    cfg = load_experiment(args.experiment, overrides)
    warm = load_experiment(args.experiment, [*overrides, "train.epochs=1"])
    train_experiment(warm, TrainOptions(data_dir=args.data_dir, device=args.device, track=False, progress=False))
    from cifar.tracking import check_tracking_store

    check_tracking_store()  # a store's tables are made once per machine, not per run

    clocks: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    accuracies: dict[bool, list[float]] = {False: [], True: []}
    own: list[dict[str, float]] = []
    for repeat in range(repeats):
        for track in (False, True) if repeat % 2 == 0 else (True, False):
            with timing_tracking_code() as seconds:
                start = time.perf_counter()
                out = train_experiment(
                    cfg,
                    TrainOptions(
                        data_dir=args.data_dir,
                        device=args.device,
                        track=track,
                        progress=False,
                        mlflow_experiment="bench-tracking-overhead",
                    ),
                )
                total = time.perf_counter() - start
            if track:
                own.append(dict(seconds))
            clocks[track].append((out.fit.train_seconds, total))
            label = "tracked" if track else "untracked"
            print(
                f"{label}: training {out.fit.train_seconds:.2f} s, whole call {total:.2f} s, "
                f"test accuracy {out.test.accuracy:.4f}",
                flush=True,
            )
            accuracies[track].append(out.test.accuracy)
    tmp.cleanup()

    def mean(track: bool, i: int) -> float:
        return statistics.mean(c[i] for c in clocks[track])

    fit_off, fit_on, all_off, all_on = mean(False, 0), mean(True, 0), mean(False, 1), mean(True, 1)
    own_in, own_bg, own_after = (
        statistics.mean(o.get(k, 0.0) for o in own) for k in ("in_clock", "background_cpu", "after_clock")
    )
    lines = [
        f"setting: `{cfg.name}` (width {cfg.model.width}, {cfg.train.epochs} epochs, "
        f"subset {cfg.data.subset or 'all'}), {repeats} pair(s){' in ABBA order' if repeats > 1 else ''}, "
        f"{machine_name(args.device)}",
        f"training clock: untracked {fit_off:.2f} s, tracked {fit_on:.2f} s "
        f"(overhead {100 * (fit_on / fit_off - 1):+.1f}%)",
        f"whole run incl. logging the model: untracked {all_off:.2f} s, tracked {all_on:.2f} s "
        f"(overhead {100 * (all_on / all_off - 1):+.1f}%, {all_on - all_off:.1f} s)",
        "tracking code's own time per tracked run: "
        f"{own_in:.2f} s on the training thread inside the clock ({100 * own_in / fit_off:.2f}% of it: epoch "
        f"metrics, checkpoints), {own_bg:.2f} s CPU of the background upload, {own_after:.1f} s outside the "
        f"clock (run start, lineage, report, figures, model): {own_in + own_after:.1f} s in all, "
        f"{100 * (own_in + own_after) / all_off:.1f}% of the untracked call",
        f"test accuracy: untracked {statistics.mean(accuracies[False]):.4f}, "
        f"tracked {statistics.mean(accuracies[True]):.4f}",
    ]
    record("tracking_overhead" + (" (quick)" if args.quick else ""), lines, write=not args.no_results)


if __name__ == "__main__":
    main()

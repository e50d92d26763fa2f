"""What MLflow tracking costs: the same experiment untracked and tracked, side by side in one run.

    python benchmarks/tracking_overhead.py [--experiment cpu] [--repeats 2] [--quick]

Runs alternate (untracked, tracked, untracked, ...) after a one-epoch warm-up so drift in the
machine's speed falls on both. Two clocks: the training clock (all epochs, with the per-epoch
asynchronous metric logging inside it) and the whole ``train_experiment`` call (data, test pass,
and for the tracked run: run creation, dataset lineage, evaluation report, figures, weights,
ONNX export with its parity check and the logged model). Tracked runs go to a temporary SQLite
store unless MLFLOW_TRACKING_URI is set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine_name, record


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
    for _ in range(repeats):
        for track in (False, True):
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
    lines = [
        f"setting: `{cfg.name}` (width {cfg.model.width}, {cfg.train.epochs} epochs, "
        f"subset {cfg.data.subset or 'all'}), {repeats} pair(s), "
        f"{machine_name(args.device)}",
        f"training clock: untracked {fit_off:.2f} s, tracked {fit_on:.2f} s "
        f"(overhead {100 * (fit_on / fit_off - 1):+.1f}%)",
        f"whole run incl. logging the model: untracked {all_off:.2f} s, tracked {all_on:.2f} s "
        f"(overhead {100 * (all_on / all_off - 1):+.1f}%, {all_on - all_off:.1f} s)",
        f"test accuracy: untracked {statistics.mean(accuracies[False]):.4f}, "
        f"tracked {statistics.mean(accuracies[True]):.4f}",
    ]
    record("tracking_overhead" + (" (quick)" if args.quick else ""), lines, write=not args.no_results)


if __name__ == "__main__":
    main()

"""What MLflow tracking costs: the same experiment untracked, tracked, and tracked with MLflow's
system metrics, side by side in one run.

    python benchmarks/tracking_overhead.py [--experiment cpu] [--repeats 2] [--quick]

Runs rotate after a one-epoch warm-up, the order reversed every other round (untracked,
tracked, tracked + system metrics, then backwards), so a steady drift in the machine's speed
falls on every arm equally. System metrics are MLflow's sampler thread (psutil every
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` s, 10 by default): its own CPU time is measured
too, since it is far below the clocks' noise. Two clocks:
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
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    import cifar.run.training
    from cifar.tracking.runs import TrainingRun

    seconds: dict[str, float] = defaultdict(float)
    hooks = [  # (owner, attribute, bucket, clock)
        (TrainingRun, "log_epoch", "in_clock", time.perf_counter),
        (cifar.run.training, "save_checkpoint", "in_clock", time.perf_counter),  # tracked runs only
        (TrainingRun, "push_metrics", "background_cpu", time.thread_time),  # the uploader thread
        (TrainingRun, "__enter__", "after_clock", time.perf_counter),  # run start: before the clock, counted here
        (TrainingRun, "log_data", "after_clock", time.perf_counter),
        (TrainingRun, "log_results", "after_clock", time.perf_counter),
        (TrainingRun, "__exit__", "after_clock", time.perf_counter),
        (SystemMetricsMonitor, "monitor", "sampler_cpu", time.thread_time),  # the whole sampler thread
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


ARMS = ("untracked", "tracked", "tracked + system metrics")


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
        help="quarter-width model, 5,000 images x 2 epochs, one round (under 3 minutes on 2 fp32 cores)",
    )
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()

    from cifar.config import load_experiment
    from cifar.run.training import TrainOptions, train_experiment

    quick = ["model.width=0.25", "data.subset=5000", "train.epochs=2"]
    # every run compared trains the same epochs: the recipe's time budget (if any) would plan each anew
    overrides = ["train.time_budget=0", *(quick if args.quick else []), *args.overrides]
    repeats = 1 if args.quick else args.repeats
    tmp = tempfile.TemporaryDirectory(prefix="tracking-overhead-")
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp.name}/mlflow.db"
    cfg = load_experiment(args.experiment, overrides)
    warm = load_experiment(args.experiment, [*overrides, "train.epochs=1"])
    train_experiment(warm, TrainOptions(data_dir=args.data_dir, device=args.device, track=False, progress=False))
    from cifar.tracking import check_tracking_store

    check_tracking_store()  # a store's tables are made once per machine, not per run

    clocks: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    accuracies: dict[str, list[float]] = {arm: [] for arm in ARMS}
    own: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for repeat in range(repeats):
        for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
            os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = str(arm == ARMS[2]).lower()
            with timing_tracking_code() as seconds:
                start = time.perf_counter()
                out = train_experiment(
                    cfg,
                    TrainOptions(
                        data_dir=args.data_dir,
                        device=args.device,
                        track=arm != ARMS[0],
                        progress=False,
                        mlflow_experiment="bench-tracking-overhead",
                    ),
                )
                total = time.perf_counter() - start
            own[arm].append(dict(seconds))
            clocks[arm].append((out.fit.train_seconds, total))
            accuracies[arm].append(out.test.accuracy)
            print(
                f"{arm}: training {out.fit.train_seconds:.2f} s, whole call {total:.2f} s, "
                f"test accuracy {out.test.accuracy:.4f}",
                flush=True,
            )
    os.environ.pop("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    samples = _system_metric_samples("bench-tracking-overhead") if ARMS[2] in clocks else 0
    tmp.cleanup()

    def mean(arm: str, i: int) -> float:
        return statistics.mean(c[i] for c in clocks[arm])

    def own_mean(arm: str, key: str) -> float:
        return statistics.mean(o.get(key, 0.0) for o in own[arm])

    fit = {arm: mean(arm, 0) for arm in ARMS}
    whole = {arm: mean(arm, 1) for arm in ARMS}
    tracked, system = ARMS[1], ARMS[2]
    own_in, own_bg, own_after = (own_mean(tracked, k) for k in ("in_clock", "background_cpu", "after_clock"))
    sampler = own_mean(system, "sampler_cpu")

    def versus(arm: str, base: str, clock: dict[str, float]) -> str:
        return f"{clock[arm]:.2f} s ({100 * (clock[arm] / clock[base] - 1):+.1f}% against {base})"

    lines = [
        f"setting: `{cfg.name}` (width {cfg.model.width}, {cfg.train.epochs} epochs, "
        f"subset {cfg.data.subset or 'all'}), {repeats} round(s){' in alternating order' if repeats > 1 else ''}, "
        f"{machine_name(args.device)}",
        f"training clock: untracked {fit[ARMS[0]]:.2f} s, tracked {versus(tracked, ARMS[0], fit)}, "
        f"tracked + system metrics {versus(system, tracked, fit)}",
        f"whole run incl. logging the model: untracked {whole[ARMS[0]]:.2f} s, tracked "
        f"{versus(tracked, ARMS[0], whole)}, tracked + system metrics {versus(system, tracked, whole)}",
        "tracking code's own time per tracked run: "
        f"{own_in:.2f} s on the training thread inside the clock ({100 * own_in / fit[ARMS[0]]:.2f}% of it: epoch "
        f"metrics, checkpoints), {own_bg:.2f} s CPU of the background upload, {own_after:.1f} s outside the "
        f"clock (run start, lineage, report, figures, model): {own_in + own_after:.1f} s in all, "
        f"{100 * (own_in + own_after) / whole[ARMS[0]]:.1f}% of the untracked call",
        f"system metrics: the sampler thread used {sampler:.3f} s CPU per run ({samples} samples logged in all), "
        f"{100 * sampler / whole[system]:.3f}% of the run's wall time on one core",
        "test accuracy: " + ", ".join(f"{arm} {statistics.mean(accuracies[arm]):.4f}" for arm in ARMS),
    ]
    record("tracking_overhead" + (" (quick)" if args.quick else ""), lines, write=not args.no_results)


def _system_metric_samples(experiment: str) -> int:
    """How many system-metric samples the store received (so a sampler that never ran cannot pass unseen)."""
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return sum(len(client.get_metric_history(r.info.run_id, "system/cpu_utilization_percentage")) for r in runs)


if __name__ == "__main__":
    main()

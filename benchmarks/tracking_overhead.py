"""What MLflow tracking costs: the same experiment untracked, tracked, and tracked with system metrics, in
rotating order after a warm-up; the training clock, the whole call, and the tracking code's own time.

    python benchmarks/tracking_overhead.py [--experiment cpu] [--repeats 2] [--quick]
"""

import contextlib
import os
import statistics
import tempfile
from collections import defaultdict
from time import perf_counter, thread_time
from unittest import mock

import mlflow
from harness import parser, record, timed, train
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

import cifar.run.training
from cifar.tracking import check_tracking_store
from cifar.tracking.runs import TrainingRun

ARMS = ("untracked", "tracked", "tracked + system metrics")
HOOKS = [  # (owner, attribute, bucket, clock) timed while the tracking runs
    (TrainingRun, "log_epoch", "in_clock", perf_counter),
    (cifar.run.training, "save_checkpoint", "in_clock", perf_counter),  # tracked runs only
    (TrainingRun, "push_metrics", "upload_cpu", thread_time),  # the uploader thread
    # after the clock; the run's start (before the clock) is counted here too
    *((TrainingRun, hook, "after_clock", perf_counter) for hook in ("__enter__", "log_data", "publish", "__exit__")),
    (SystemMetricsMonitor, "monitor", "sampler_cpu", thread_time),  # the whole sampler thread
]


@contextlib.contextmanager
def timing_tracking_code():
    """Seconds spent in the tracking hooks, by where they run, while the block runs."""
    seconds: dict[str, float] = defaultdict(float)

    def timed_hook(function, bucket, clock):
        def call(*args, **kwargs):
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[bucket] += clock() - start

        return call

    with contextlib.ExitStack() as stack:
        for owner, name, bucket, clock in HOOKS:
            stack.enter_context(mock.patch.object(owner, name, timed_hook(getattr(owner, name), bucket, clock)))
        yield seconds


if __name__ == "__main__":
    p = parser(__doc__, "experiment set device data-dir", quick="quarter width, 5,000 images x 2 epochs, one round")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    # every run compared trains the same epochs: the recipe's time budget (if any) would plan each anew
    quick = ["model.width=0.25", "data.subset=5000", "train.epochs=2"] * args.quick
    overrides, repeats = ["train.time_budget=0", *quick, *args.overrides], 1 if args.quick else args.repeats
    tmp = tempfile.TemporaryDirectory(prefix="tracking-overhead-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp.name}/mlflow.db")
    train(args, args.experiment, [*overrides, "train.epochs=1"])  # the warm-up
    check_tracking_store()  # a store's tables are made once per machine, not per run
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for repeat in range(repeats):
        for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
            os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = str(arm == ARMS[2]).lower()
            with timing_tracking_code() as seconds:
                track = {"track": arm != ARMS[0], "mlflow_experiment": "bench-tracking-overhead"}
                (cfg, out), whole = timed(train, args, args.experiment, overrides, **track)
                seconds.update(fit=out.fit.train_seconds, whole=whole)
            runs[arm].append(dict(seconds))
            print(f"{arm}: training {seconds['fit']:.2f} s, whole call {whole:.2f} s, test {out.test.accuracy:.4f}")
    os.environ.pop("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    client = mlflow.MlflowClient()  # the samples the store received: a sampler that never ran shows
    logged = client.search_runs([client.get_experiment_by_name("bench-tracking-overhead").experiment_id])
    samples = sum(len(client.get_metric_history(r.info.run_id, "system/cpu_utilization_percentage")) for r in logged)
    tmp.cleanup()

    def mean(arm: int, key: str) -> float:
        return statistics.mean(run.get(key, 0.0) for run in runs[ARMS[arm]])

    own = mean(1, "in_clock") + mean(1, "after_clock")
    figures = {"width": cfg.model.width, "epochs": cfg.train.epochs, "subset": cfg.data.subset or "all"}
    figures |= {"rounds": repeats, "untracked training s": mean(0, "fit"), "untracked whole run s": mean(0, "whole")}
    for clock, key in (("training", "fit"), ("whole run", "whole")):  # % over the arm before
        figures[f"tracked {clock} +%"] = 100 * (mean(1, key) / mean(0, key) - 1)
        figures[f"system metrics {clock} +%"] = 100 * (mean(2, key) / mean(1, key) - 1)
    figures |= {"tracking code in the clock s": mean(1, "in_clock"), "upload CPU s": mean(1, "upload_cpu"),
                "tracking code per run s": own, "tracking code % of untracked run": 100 * own / mean(0, "whole"),
                "sampler CPU s": mean(2, "sampler_cpu"), "samples": samples}  # fmt: skip
    record("tracking_overhead" + ".quick" * args.quick, figures, args)

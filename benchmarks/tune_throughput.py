"""Trials per hour of ``tune.py`` with 1 and 2 workers on one study, side by side in one run.

    python benchmarks/tune_throughput.py [--trials 8 --subset 5000 --epochs 2] [--space S] [--storage URL] [--quick]
    python benchmarks/tune_throughput.py --postgres     # a private PostgreSQL + mlflow server (team stack)

Worker processes are real ``tune.py`` runs sharing one Optuna study (a temporary SQLite
``optuna.db`` unless --storage names another RDB, e.g. PostgreSQL) and one MLflow store (a
temporary SQLite one unless MLFLOW_TRACKING_URI is set). With 1 worker it runs all the trials;
with 2, each runs half, at the same time, with the machine's cores split between them
(OMP_NUM_THREADS), as the README advises for several workers on one machine.
Counts finished trials (complete + pruned) over wall time, start-up included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine_name, record


def run_workers(workers: int, trials: int, args, storage: str, env: dict[str, str]) -> tuple[float, dict[str, int]]:
    import optuna

    study = f"throughput-{workers}w-{int(time.time())}"
    threads = max(1, (os.cpu_count() or 1) // workers)
    cmd = [
        sys.executable,
        "tune.py",
        "--experiment",
        args.experiment,
        "--study-name",
        study,
        "--storage",
        storage,
        "--n-trials",
        str(trials // workers),
        "--epochs-per-trial",
        str(args.epochs),
        "--subset",
        str(args.subset),
    ]
    if args.space:
        cmd += ["--space", str(args.space)]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*cmd, "--seed", str(i)],
            cwd=ROOT,
            env={**env, "OMP_NUM_THREADS": str(threads)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"tune.py worker failed ({proc.returncode}):\n{err[-2000:]}")
    wall = time.perf_counter() - start
    states: dict[str, int] = {}
    for trial in optuna.load_study(study_name=study, storage=storage).trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    return wall, states


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cpu")
    p.add_argument("--space", type=Path, help="search space (default: the experiment's)")
    p.add_argument("--trials", type=int, default=8, help="trials in all, per setting (even)")
    p.add_argument("--subset", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--storage", help="Optuna RDB URL (default: a temporary SQLite file)")
    p.add_argument("--postgres", action="store_true", help="start a private PostgreSQL 15 and an mlflow server on it")
    p.add_argument("--data-dir", type=Path)
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 trials of 1 epoch on 2,000 images each, quarter-width space (under 2 min)",
    )
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.trials, args.subset, args.epochs = 2, 2000, 1
        args.space = args.space or Path(__file__).with_name("quick_space.yaml")

    tmp = tempfile.TemporaryDirectory(prefix="tune-throughput-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") or k == "MLFLOW_TRACKING_URI"}
    with contextlib.ExitStack() as stack:
        if args.postgres:
            from cifar.ops.localstack import MlflowServer, PostgresCluster

            cluster = stack.enter_context(PostgresCluster(tempfile.mkdtemp(prefix="cifar-pg-")))
            args.storage = cluster.create_database("optuna")
            server = stack.enter_context(MlflowServer(cluster.create_database("mlflow"), Path(tmp.name) / "artifacts"))
            env["MLFLOW_TRACKING_URI"] = server.url
        storage = args.storage or f"sqlite:///{tmp.name}/optuna.db"
        env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp.name}/mlflow.db")
        results = {}
        for workers in (1, 2):
            wall, states = run_workers(workers, args.trials, args, storage, env)
            done = states.get("COMPLETE", 0) + states.get("PRUNED", 0)
            results[workers] = done / wall * 3600
            print(f"{workers} worker(s): {done} trials in {wall:.1f} s = {results[workers]:.0f} trials/hour; {states}")
    tmp.cleanup()

    backend = storage.split(":", 1)[0].split("+")[0]
    if args.postgres:
        backend += " + mlflow server on postgresql"
    lines = [
        f"setting: `{args.experiment}` recipe, {args.space.name if args.space else 'its'} space, "
        f"{args.trials} trials of {args.epochs} epoch(s) on {args.subset:,} "
        f"images, Optuna storage {backend}, {machine_name()}",
        f"1 worker {results[1]:.0f} trials/hour; 2 workers {results[2]:.0f} trials/hour "
        f"(ratio {results[2] / results[1]:.2f}x)",
    ]
    record("tune_throughput" + (" (quick)" if args.quick else ""), lines, write=not args.no_results)


if __name__ == "__main__":
    main()

"""Trials per hour of real ``tune.py`` workers, 1 and then 2 (splitting the cores) on one Optuna study and MLflow
store (temporary SQLite unless --storage / MLFLOW_TRACKING_URI say), start-up included.

    python benchmarks/tune_throughput.py [--trials 8 --subset 5000 --epochs 2] [--space S] [--storage URL] [--quick]
    python benchmarks/tune_throughput.py --postgres     # a private PostgreSQL + mlflow server (team stack)
"""

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

import optuna
from harness import ROOT, parser, record

from cifar.ops.localstack import MlflowServer, PostgresCluster


def trials_per_hour(workers: int, args, storage: str, env: dict[str, str]) -> float:
    """Completed or pruned trials per hour of ``workers`` tune.py processes sharing ``args.trials``."""
    study = f"throughput-{workers}w-{int(time.time())}"
    cmd = [sys.executable, "tune.py", "--experiment", args.experiment, "--study-name", study, "--storage", storage]
    cmd += ["--n-trials", str(args.trials // workers), "--epochs-per-trial", str(args.epochs)]
    cmd += ["--subset", str(args.subset)]
    cmd += [x for k, v in (("--space", args.space), ("--data-dir", args.data_dir)) if v for x in (k, str(v))]
    env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    popen = partial(subprocess.Popen, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.perf_counter()
    procs = [popen([*cmd, "--seed", str(i)]) for i in range(workers)]
    errors = [proc.communicate()[1] for proc in procs]  # stderr read while they run
    wall = time.perf_counter() - start
    for proc, err in zip(procs, errors):
        if proc.returncode:
            raise SystemExit(f"tune.py worker failed ({proc.returncode}):\n{err[-2000:]}")
    states = Counter(t.state.name for t in optuna.load_study(study_name=study, storage=storage).trials)
    print(f"{workers} worker(s): {dict(states)} in {wall:.1f} s", flush=True)
    return (states["COMPLETE"] + states["PRUNED"]) / wall * 3600


if __name__ == "__main__":
    p = parser(__doc__, "experiment data-dir", quick="2 trials of 1 epoch on 2,000 images, quarter width")
    p.add_argument("--space", type=Path, help="search space (default: the experiment's)")
    p.add_argument("--trials", type=int, default=8, help="trials in all, per setting (even)")
    p.add_argument("--subset", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--storage", help="Optuna RDB URL (default: a temporary SQLite file)")
    p.add_argument("--postgres", action="store_true", help="start a private PostgreSQL 15 and an mlflow server on it")
    args = p.parse_args()
    if args.quick:
        args.trials, args.subset, args.epochs = 2, 2000, 1
        args.space = args.space or Path(__file__).with_name("quick_space.yaml")
    tmp = tempfile.TemporaryDirectory(prefix="tune-throughput-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") or k == "MLFLOW_TRACKING_URI"}
    space = args.space.name if args.space else "the experiment's"
    figures = {"space": space, "trials": args.trials, "epochs": args.epochs, "subset": args.subset}
    with contextlib.ExitStack() as stack:
        if args.postgres:
            cluster = stack.enter_context(PostgresCluster(tempfile.mkdtemp(prefix="cifar-pg-")))
            args.storage = cluster.create_database("optuna")
            server = stack.enter_context(MlflowServer(cluster.create_database("mlflow"), Path(tmp.name) / "artifacts"))
            env["MLFLOW_TRACKING_URI"] = server.url
        storage = args.storage or f"sqlite:///{tmp.name}/optuna.db"
        env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp.name}/mlflow.db")
        figures["storage"] = storage.split(":", 1)[0].split("+")[0] + " + mlflow server" * args.postgres
        figures |= {f"{n} worker trials/h": trials_per_hour(n, args, storage, env) for n in (1, 2)}
    tmp.cleanup()
    figures["ratio"] = figures["2 worker trials/h"] / figures["1 worker trials/h"]
    record("tune_throughput" + ".quick" * args.quick, figures, args)

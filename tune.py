"""Search a recipe's hyperparameters with Optuna; every trial is a nested MLflow run.

    python tune.py --experiment cpu --n-trials 20 --epochs-per-trial 4 --subset 10000
    python tune.py --study-name cpu-search            # resume (or join as a second worker)
    python tune.py --storage postgresql://user@host/optuna ...   # workers on many machines

--n-trials counts this worker's trials (Optuna's parallel mode: N workers run N x n trials).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cpu", help="recipe to search around (default cpu)")
    p.add_argument(
        "--space", help="search space: name in experiments/search/ or a .yaml path (default: the experiment's)"
    )
    p.add_argument("--n-trials", type=int, default=20, help="trials for this worker (0 = until --timeout)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--study-name", help="default <experiment>-search; an existing study is resumed")
    p.add_argument("--storage", help="Optuna RDB URL (default sqlite:///optuna.db here)")
    p.add_argument("--epochs-per-trial", type=int, help="train.epochs for every trial (default: the recipe's)")
    p.add_argument("--subset", type=int, help="training images per trial (default all)")
    p.add_argument(
        "--seed",
        type=int,
        help="sampler seed (give parallel workers different seeds, or none: each worker then picks its own)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--dataset", default="", help="a prepared dataset other than CIFAR-10")
    p.add_argument("--heartbeat-interval", type=int, default=10, help="seconds between a running trial's heartbeats")
    p.add_argument("--grace-period", type=int, default=30, help="seconds without heartbeat before a trial is failed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cifar.search import TuneOptions, run_search

    study = run_search(
        TuneOptions(
            experiment=args.experiment,
            space=args.space,
            n_trials=args.n_trials or None,
            timeout=args.timeout,
            study_name=args.study_name,
            storage=args.storage,
            epochs_per_trial=args.epochs_per_trial or None,
            subset=args.subset or None,
            seed=args.seed,
            data_dir=args.data_dir,
            dataset=args.dataset,
            device=args.device,
            heartbeat_interval=args.heartbeat_interval,
            grace_period=args.grace_period,
        )
    )
    if study is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    try:
        print(f"Best trial {study.best_trial.number}: val accuracy {study.best_value:.4f} with {study.best_params}")
    except ValueError:
        print("No trial completed.")
    print("Promote the best run with: python register.py --study-name " + study.study_name)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Train a CIFAR-10 classifier from an experiment recipe; every run is an MLflow run.

python train.py --experiment cpu
python train.py --experiment baseline --epochs 3 --set optim.lr=0.05
python train.py --config path/to/resolved.yaml     # reproduce a logged run
python train.py --resume RUN_ID                    # continue a run stopped by SIGTERM / Ctrl-C

SIGTERM or Ctrl-C stops after the current step, saves a checkpoint (checkpoints/<run_id>/, also
logged to the run) and marks the run KILLED; a second one stops at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar.cli import run_cli
from cifar.config import available_experiments, load_experiment


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--experiment", default="cpu", help=f"recipe name ({', '.join(available_experiments())}) or .yaml path"
    )
    p.add_argument("--config", help="a resolved recipe (.yaml), e.g. a run's config/experiment.yaml artifact")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe field, e.g. --set optim.lr=0.2 (repeatable)",
    )
    p.add_argument("--epochs", type=int, help="train.epochs (0 = the recipe's)")
    p.add_argument("--batch-size", type=int, help="train.batch_size")
    p.add_argument("--lr", type=float, help="optim.lr")
    p.add_argument("--subset", type=int, help="use N training images (0 = all)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument(
        "--time-budget", type=float, metavar="SECONDS", help="train.time_budget: epochs chosen to fit, measured here"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--mlflow-experiment", help="MLflow experiment (default: the recipe's name)")
    p.add_argument("--data-dir", type=Path, help="prepared data folder (default $CIFAR_DATA or ./data)")
    p.add_argument("--dataset", help="a prepared dataset other than CIFAR-10 (python -m cifar.data prepare --dataset)")
    p.add_argument(
        "--source", help="where to prepare data from if the cache is missing (default $CIFAR_SOURCE or download)"
    )
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow (benchmarks)")
    p.add_argument("--save-dir", type=Path, help="also write safetensors weights, config and metrics here")
    p.add_argument(
        "--no-progress", action="store_true", help="no per-step progress bar (epoch lines and results still print)"
    )
    p.add_argument("--resume", metavar="RUN_ID", help="continue this interrupted run from its checkpoint")
    return p


def overrides_from_flags(args: argparse.Namespace) -> list[str]:
    flags = {
        "train.epochs": args.epochs,
        "train.time_budget": args.time_budget,
        "train.batch_size": args.batch_size,
        "optim.lr": args.lr,
        "data.subset": args.subset,
        "train.seed": args.seed,
    }
    out = [
        f"{key}={value}" for key, value in flags.items() if value not in (None, 0) or key == "train.seed" and value == 0
    ]
    if args.compile:
        out.append("train.compile=true")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        return resume(args)
    recipe = args.config or args.experiment
    # Each --set may hold several space-separated KEY=VALUE pairs (that is how MLproject passes them).
    overrides = [item for text in args.overrides for item in text.split()]
    from cifar.engine import device_kind, resolve_device
    from cifar.run.training import TrainOptions, train_experiment

    kind = device_kind(resolve_device(args.device))  # the recipe's values for this machine (its devices:)
    cfg = load_experiment(recipe, [*overrides, *overrides_from_flags(args)], device_kind=kind)

    outcome = train_experiment(
        cfg,
        TrainOptions(
            data_dir=args.data_dir,
            dataset=args.dataset,
            source=args.source,
            device=args.device,
            run_name=args.run_name,
            mlflow_experiment=args.mlflow_experiment,
            experiment_file=str(recipe),
            track=not args.no_track,
            progress_bar=not args.no_progress,
            save_dir=args.save_dir,
        ),
    )
    if outcome.run_id:
        print(f"MLflow run {outcome.run_id}; model {outcome.model_uri}. Browse it with: make ui (or mlflow ui)")
    return 0


def resume(args: argparse.Namespace) -> int:
    from cifar.errors import CifarError
    from cifar.run.training import TrainOptions, resume_training

    changed = [flag for flag in ("config", "epochs", "batch_size", "lr", "subset", "seed") if getattr(args, flag)]
    if changed or args.overrides or args.no_track:
        raise CifarError(
            "--resume continues a run with its own recipe; drop --"
            + ", --".join([*changed, *(["set"] * bool(args.overrides))])
            + (" and --no-track" if args.no_track else "")
        )
    outcome = resume_training(
        args.resume,
        TrainOptions(data_dir=args.data_dir, source=args.source, device=args.device, progress_bar=not args.no_progress,
                     save_dir=args.save_dir),
    )  # fmt: skip
    print(f"MLflow run {outcome.run_id} finished; model {outcome.model_uri}.")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Accuracy against training time for an experiment, over several seeds (airbench style).

    python benchmarks/time_to_accuracy.py --experiment speedrun --seeds 5 [--set train.epochs=8]
    python benchmarks/time_to_accuracy.py --quick --track   # make bench: half width, 4,000 images, 3 epochs

Prints per-seed test accuracy and training seconds, then mean +- std; writes a per-epoch CSV
(validation accuracy against cumulative seconds) and a plot next to it, and appends a row to
benchmarks/RESULTS.md. A one-epoch warm-up run first keeps start-up costs out of the figures.
Runs untracked unless --track is given (then each seed is an MLflow run).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_name  # noqa: E402

from cifar.config import load_experiment  # noqa: E402
from cifar.run.training import TrainOptions, train_experiment  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="cpu")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--track", action="store_true")
    p.add_argument("--save-dir", type=Path, help="keep the weights of the last seed here")
    p.add_argument("--quick", action="store_true", help="half-width model, 4,000 images, 3 epochs (under 2 min)")
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args()
    if args.quick:
        args.overrides = ["model.width=0.5", "data.subset=4000", "train.epochs=3", *args.overrides]

    from cifar.engine import device_kind, resolve_device

    kind = device_kind(resolve_device(args.device))
    cfg = load_experiment(args.experiment, args.overrides, kind)
    warm = load_experiment(args.experiment, [*args.overrides, "train.epochs=1"], kind)
    train_experiment(warm, TrainOptions(data_dir=args.data_dir, device=args.device, track=False, progress=False))

    rows, finals = [], []
    for seed in range(args.seeds):
        seeded = load_experiment(args.experiment, [*args.overrides, f"train.seed={seed}"], kind)
        out = train_experiment(
            seeded,
            TrainOptions(
                data_dir=args.data_dir,
                device=args.device,
                track=args.track,
                progress=False,
                mlflow_experiment=f"bench-{cfg.name}",
                save_dir=args.save_dir if seed == args.seeds - 1 else None,
            ),
        )
        elapsed = 0.0
        for m in out.fit.history:
            elapsed += m.epoch_seconds
            rows.append({"seed": seed, "epoch": m.epoch, "seconds": round(elapsed, 3), "val_accuracy": m.val_accuracy})
        finals.append((out.test.accuracy, out.fit.train_seconds))
        print(f"seed {seed}: test accuracy {out.test.accuracy:.4f}, training {out.fit.train_seconds:.2f} s", flush=True)

    accs, secs = [a for a, _ in finals], [s for _, s in finals]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    machine = machine_name(args.device)
    setting = f"{cfg.name} (width {cfg.model.width}, {cfg.train.epochs} epochs, subset {cfg.data.subset or 'all'})"
    summary = (
        f"{setting}, {len(accs)} seed(s), on {machine}: test accuracy "
        f"{statistics.mean(accs):.4f} +- {std:.4f} (min {min(accs):.4f}), training {statistics.mean(secs):.2f} s "
        f"+- {statistics.stdev(secs) if len(secs) > 1 else 0:.2f}"
    )
    print(summary)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"time_to_accuracy_{cfg.name}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from cifar.plots import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for seed in range(args.seeds):
        pts = [r for r in rows if r["seed"] == seed]
        ax.plot([r["seconds"] for r in pts], [r["val_accuracy"] for r in pts], "o-", ms=3, label=f"seed {seed}")
    ax.set_title(f"Validation accuracy vs training time\n{setting}\n{machine}", fontsize=10)
    ax.set(xlabel="seconds", ylabel="val accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(f"{stem}.png", dpi=120)
    if not args.no_results:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(f"- {date.today()} time_to_accuracy: {summary}\n")


if __name__ == "__main__":
    main()

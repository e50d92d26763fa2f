"""Accuracy against training time for an experiment over seeds, after a one-epoch warm-up; a per-epoch CSV
(validation accuracy against seconds) and its plot in benchmarks/out. --track: each seed an MLflow run.

    python benchmarks/time_to_accuracy.py --experiment speedrun --seeds 5 [--set train.epochs=8]
    python benchmarks/time_to_accuracy.py --quick --track   # make bench: half width, 4,000 images, 3 epochs
"""

import csv
import statistics
from pathlib import Path

from harness import machine_name, parser, record, train

from cifar.plots import Figure

if __name__ == "__main__":
    p = parser(
        __doc__,
        "--experiment",
        "--seeds",
        "--set",
        "--device",
        "--data-dir",
        quick="half-width model, 4,000 images, 3 epochs (under 2 min)",
    )
    p.add_argument("--track", action="store_true")
    args = p.parse_args()
    overrides = ["model.width=0.5", "data.subset=4000", "train.epochs=3"] * args.quick + args.overrides
    warm, _ = train(args, args.experiment, [*overrides, "train.epochs=1"])
    rows, accs, secs = [], [], []
    for seed in range(args.seeds):
        cfg, out = train(
            args,
            args.experiment,
            [*overrides, f"train.seed={seed}"],
            track=args.track,
            mlflow_experiment=f"bench-{warm.name}",
        )
        elapsed = 0.0
        for m in out.fit.history:
            elapsed += m.epoch_seconds
            rows.append({"seed": seed, "epoch": m.epoch, "seconds": round(elapsed, 3), "val_accuracy": m.val_accuracy})
        accs.append(100 * out.test.accuracy)
        secs.append(out.fit.train_seconds)
        print(f"seed {seed}: test accuracy {accs[-1]:.2f}%, training {secs[-1]:.2f} s", flush=True)
    (stem := Path("benchmarks/out") / f"time_to_accuracy_{cfg.name}").parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writeheader()
        csv.writer(f).writerows(r.values() for r in rows)
    setting = f"{cfg.name} (width {cfg.model.width}, {cfg.train.epochs} epochs, subset {cfg.data.subset or 'all'})"
    ax = (fig := Figure(figsize=(7, 4.5), layout="constrained")).subplots()
    for seed in range(args.seeds):
        pts = [r for r in rows if r["seed"] == seed]
        ax.plot([r["seconds"] for r in pts], [r["val_accuracy"] for r in pts], "o-", ms=3, label=f"seed {seed}")
    ax.set_title(f"Validation accuracy vs training time\n{setting}\n{machine_name(args.device)}", fontsize=10)
    ax.set(xlabel="seconds", ylabel="val accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(f"{stem}.png", dpi=120)
    std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (accs, secs)]
    figures = {
        "width": cfg.model.width,
        "epochs": cfg.train.epochs,
        "subset": cfg.data.subset or "all",
        "test %": statistics.mean(accs),
        "test % std": std[0],
        "test % min": min(accs),
        "training s": statistics.mean(secs),
        "training s std": std[1],
    }
    record(
        f"time_to_accuracy.{cfg.name}" + ".quick" * args.quick,
        figures,
        seeds=range(args.seeds),
        device=args.device,
        write=not args.no_results,
    )

"""Accuracy against training time over seeds, after a one-epoch warm-up, with a per-epoch CSV and plot (validation
accuracy against seconds) in benchmarks/out; --track: each seed an MLflow run, and its calibrated test ECE and
out-of-distribution AUROCs recorded too.

    python benchmarks/time_to_accuracy.py --experiment speedrun --seeds 5 [--set train.epochs=8]
    python benchmarks/time_to_accuracy.py --dataset fashion-mnist --seeds 3 --track   # the budgeted default
    python benchmarks/time_to_accuracy.py --quick --track   # make bench: half width, 4,000 images, 3 epochs
"""

import csv
import itertools
from pathlib import Path

import mlflow
from harness import machine_kind, parser, record, spread, train

from cifar.plots import Figure
from cifar.tracking.names import code_names

if __name__ == "__main__":
    shared = "experiment seeds set device data-dir dataset"
    p = parser(__doc__, shared, quick="half-width model, 4,000 images, 3 epochs")
    p.add_argument("--track", action="store_true")
    args = p.parse_args()
    overrides = ["model.width=0.5", "data.subset=4000", "train.epochs=3"] * args.quick + args.overrides
    warm, _ = train(args, args.experiment, [*overrides, "train.epochs=1"])
    rows, accs, secs, trust = [], [], [], []
    for seed in range(args.seeds):
        track = {"track": args.track, "mlflow_experiment": f"bench-{warm.name}"}
        cfg, out = train(args, args.experiment, [*overrides, f"train.seed={seed}"], **track)
        seconds = itertools.accumulate(m.epoch_seconds for m in out.fit.history)
        rows += [(seed, m.epoch, round(s, 3), m.val_accuracy) for m, s in zip(out.fit.history, seconds)]
        accs.append(100 * out.test.accuracy)
        secs.append(out.fit.train_seconds)
        if out.run_id:  # tracked: what the served model's calibration measured
            metrics = code_names(mlflow.get_run(out.run_id).data.metrics)
            trust.append({k: v for k, v in metrics.items() if k == "test_ece_calibrated" or k.startswith("ood_auroc_")})
        print(f"seed {seed}: test accuracy {accs[-1]:.2f}%, training {secs[-1]:.2f} s", flush=True)
    name = f"{args.dataset}.{cfg.name}" if args.dataset else cfg.name
    (stem := Path("benchmarks/out") / f"time_to_accuracy_{name}").parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        csv.writer(f).writerows([("seed", "epoch", "seconds", "val_accuracy"), *rows])
    setting = f"{cfg.name} (width {cfg.model.width}, {cfg.train.epochs} epochs, subset {cfg.data.subset or 'all'})"
    ax = (fig := Figure(figsize=(7, 4.5), layout="constrained")).subplots()
    for seed in range(args.seeds):
        _, _, seconds, accuracy = zip(*(r for r in rows if r[0] == seed))
        ax.plot(seconds, accuracy, "o-", ms=3, label=f"seed {seed}")
    ax.set_title(f"Validation accuracy vs training time\n{setting}\n{machine_kind(args.device)}", fontsize=10)
    ax.set(xlabel="seconds", ylabel="val accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(f"{stem}.png", dpi=120)
    figures = {"width": cfg.model.width, "epochs": cfg.train.epochs, "subset": cfg.data.subset or "all"}
    figures |= spread("test %", accs) | {"test % min": min(accs)} | spread("training s", secs)
    for key in trust[0] if trust else ():
        figures |= spread(key.replace("test_ece_calibrated", "ECE"), [t[key] for t in trust])
    record(f"time_to_accuracy.{name}" + ".quick" * args.quick, figures, args)

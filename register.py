"""Promote the best run (chosen on validation) to the registry's production model.

python register.py                          # best finished run of any experiment
python register.py --study-name cpu-search  # best completed trial of a study
python register.py --dry-run                # decide and print, change nothing
python register.py --list | --rollback
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar.cli import run_cli
from cifar.registry import MODEL_NAME


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", action="append", help="MLflow experiment(s) to choose from (default: all)")
    p.add_argument("--study-name", help="choose among the completed trials of this Optuna study")
    p.add_argument("--metric", default="val_accuracy", help="validation metric to maximise (default val_accuracy)")
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--min-improvement", type=float, default=0.0, help="margin over production on the metric")
    p.add_argument("--force", action="store_true", help="promote even if it does not beat production")
    p.add_argument("--dry-run", action="store_true", help="decide and print; change nothing")
    p.add_argument("--data-dir", type=Path, help="prepared data for the test re-evaluation")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="list every version")
    group.add_argument("--rollback", action="store_true", help="move production back to the previous version")
    group.add_argument(
        "--import-bundled", action="store_true", help="register models/bundled/ (once); production if there is none"
    )
    return p


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in rows[0]}
    print("  ".join(k.ljust(w) for k, w in widths.items()))
    for row in rows:
        print("  ".join(str(row[k]).ljust(w) for k, w in widths.items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cifar import registry
    from cifar.tracking import check_tracking_store

    uri = check_tracking_store()
    name = args.model_name
    if args.list:
        rows = registry.list_versions(name)
        print(f"{name} in {uri}:" if rows else f"no versions of '{name}' in {uri}.")
        print_table(rows)
        return 0
    if args.import_bundled:
        version, promoted = registry.import_bundled(name=name)
        state = (
            "now production" if promoted else f"production stays version {registry.production_version(name).version}"
        )
        print(f"Bundled model is {name} version {version}; {state}.")
        return 0
    if args.rollback:
        old, new = registry.rollback(name)
        print(f"Rolled back: production is now version {new} (was {old}); version {old} is 'previous'.")
        return 0

    candidate = registry.find_best_run(args.experiment, args.study_name, args.metric)
    decision = registry.decide(candidate, name, args.min_improvement, args.force)
    champion = decision.champion
    print_table(
        [
            {
                "": "candidate",
                "run_id": candidate.run_id,
                "version": "(new)",
                candidate.metric: f"{candidate.value:.4f}",
                "experiment": candidate.study or candidate.experiment,
            },
            {
                "": "production",
                "run_id": champion.run_id if champion else "-",
                "version": champion.version if champion else "-",
                candidate.metric: f"{decision.champion_value:.4f}" if decision.champion_value is not None else "-",
                "experiment": champion.tags.get("study") or champion.tags.get("experiment", "-") if champion else "-",
            },
        ]
    )
    verdict = "PROMOTE" if decision.promote else "KEEP production"
    print(f"Decision: {verdict} ({decision.reason}).")
    if args.dry_run:
        print("Dry run: nothing changed.")
        return 0
    decision = registry.register_and_promote(decision, name, args.data_dir)
    state = "production" if decision.promote else "registered as a challenger"
    print(
        f"{name} version {decision.version}: {state}; test accuracy {decision.test_accuracy:.4f} "
        f"(re-evaluated now, for the record). Load it with models:/{name}@production"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

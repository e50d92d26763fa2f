"""Promote the best run (chosen on validation) to the registry's production model.

python register.py                          # best finished run of any experiment
python register.py --study-name cpu-search  # best completed trial of a study
python register.py --dry-run                # decide and print, change nothing
python register.py --max-ece 0.03 --min-ood-auroc 0.9   # also require calibration and OOD detection
python register.py --int8                   # register the run's int8 model (2-3x faster on CPU)
python register.py --list | --rollback
python register.py --dataset fashion-mnist  # the best run of that dataset -> fashion-mnist-classifier
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar.cli import run_cli
from cifar.contract.registered_model import VersionTags, model_name
from cifar.promote.bundle import import_bundled


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", action="append", help="MLflow experiment(s) to choose from (default: all)")
    p.add_argument("--study-name", help="choose among the completed trials of this Optuna study")
    p.add_argument("--metric", default="val_accuracy", help="validation metric to maximise (default val_accuracy)")
    p.add_argument("--dataset", help="choose among runs of this prepared dataset (default CIFAR-10)")
    p.add_argument("--model-name", help="registered model (default <dataset>-classifier: cifar10-classifier)")
    p.add_argument("--min-improvement", type=float, default=0.0, help="margin over production on the metric")
    p.add_argument("--force", action="store_true", help="promote even if it does not beat production")
    p.add_argument("--dry-run", action="store_true", help="decide and print; change nothing")
    p.add_argument("--max-ece", type=float, help="promote only if the calibrated test ECE is at most this")
    p.add_argument("--min-ood-auroc", type=float, help="promote only if the OOD AUROC is at least this")
    p.add_argument(
        "--robustness-images",
        type=int,
        default=500,
        help="test images per corruption and severity for the recorded mean corruption accuracy (0: skip)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="quantize the chosen run's model (cifar.assess.quantize) and register the int8 model instead",
    )
    p.add_argument(
        "--max-int8-drop",
        type=float,
        default=0.005,
        help="with --int8: the most validation accuracy quantization may cost (default 0.005)",
    )
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
    from cifar.promote import registry
    from cifar.promote.promotion import PromotionRequest, comparison_rows, decide_promotion, register_promotion
    from cifar.tracking import check_tracking_store

    uri = check_tracking_store()
    name = args.model_name or model_name(args.dataset)
    if args.list:
        rows = registry.list_versions(name)
        print(f"{name} in {uri}:" if rows else f"no versions of '{name}' in {uri}.")
        print_table(rows)
        return 0
    if args.import_bundled:
        version, promoted = import_bundled(name=name)
        production = registry.production_version(name)
        state = "now production" if promoted else f"production stays version {production.version}"
        print(f"Bundled model is {name} version {version}; {state}.")
        if VersionTags.from_tags(production.tags).source == "bundled" and registry.has_trained_runs():
            print(
                "The app serves the bundled model, not a run you trained: promote yours with python register.py "
                "(it must beat the bundled one on validation, or add --force)."
            )
        return 0
    if args.rollback:
        old, new = registry.rollback(name)
        print(f"Rolled back: production is now version {new} (was {old}); version {old} is 'previous'.")
        return 0

    req = PromotionRequest(
        experiments=args.experiment,
        study_name=args.study_name,
        metric=args.metric,
        name=name,
        min_improvement=args.min_improvement,
        force=args.force,
        max_ece=args.max_ece,
        min_ood_auroc=args.min_ood_auroc,
        int8=args.int8,
        max_int8_drop=args.max_int8_drop,
        robustness_images=args.robustness_images,
        data_dir=_dataset_folder(args),
        dataset=args.dataset or "",
        dry_run=args.dry_run,
    )
    p = decide_promotion(req)
    for note in p.notes:
        print(note)
    print_table(comparison_rows(p))
    print(f"OOD AUROC of the candidate: the lowest of {p.candidate.ood_basis}.")
    print(f"Decision: {'PROMOTE' if p.decision.promote else 'KEEP production'} ({p.decision.reason}).")
    if p.decision.refused:
        print(f"Not registered: run {p.candidate.run_id} misses a required minimum.", file=sys.stderr)
        return 1
    if args.dry_run or p.already:
        print("Dry run: nothing changed." if args.dry_run else "Nothing to do.")
        return 0
    decision = register_promotion(p, req)
    state = "production" if decision.promote else "registered as a challenger"
    print(
        f"{name} version {decision.version}: {state}; test accuracy {decision.test_accuracy:.4f} "
        f"(re-evaluated now, for the record). Load it with models:/{name}@production"
    )
    return 0


def _dataset_folder(args: argparse.Namespace) -> Path | None:
    """The data the chosen model is re-evaluated on: another dataset's must be prepared (checked before any choice)."""
    if not args.dataset:
        return args.data_dir
    from cifar.data.cache import cache_dir, dataset_dir, ensure_cache

    folder = dataset_dir(args.data_dir, args.dataset)
    if not (cache_dir(folder) / "manifest.json").is_file():
        ensure_cache(args.data_dir, dataset=args.dataset)  # not prepared: says how (the cache is read once, later)
    return folder


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Compare runs side by side: ``python -m cifar compare RUN_ID... | --experiment NAME [--top N]``.

Pulls runs with ``mlflow.search_runs`` into a DataFrame, prints the recipe fields that differ
with validation/test accuracy and training time, plots their validation curves on one figure,
and logs table and figure as a run of the ``comparisons`` experiment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from cifar.cli import run_cli
from cifar.errors import CifarError
from cifar.tracking import check_tracking_store
from cifar.tracking.names import metric_key
from cifar.tracking.store import _mlflow

RESULT_COLUMNS = {  # code name of the metric -> column (either run layout, see cifar.tracking.names)
    "best_val_accuracy": "val_accuracy",
    "test_accuracy": "test_accuracy",
    "train_seconds": "train_seconds",
    "best_epoch": "best_epoch",
}


def find_runs(run_ids: list[str] | None = None, experiment: str | None = None, top: int = 10) -> pd.DataFrame:
    mlflow = _mlflow()
    if run_ids:
        quoted = ", ".join(f"'{r}'" for r in run_ids)
        runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_id IN ({quoted})")
        missing = set(run_ids) - set(runs.get("run_id", []))
        if missing:
            raise CifarError(f"no such run(s): {', '.join(sorted(missing))} in {mlflow.get_tracking_uri()}.")
    elif experiment:
        if mlflow.get_experiment_by_name(experiment) is None:
            raise CifarError(f"no MLflow experiment named '{experiment}' in {mlflow.get_tracking_uri()}.")
        runs = mlflow.search_runs(
            experiment_names=[experiment],
            filter_string="attributes.status = 'FINISHED' and tags.model_uri != ''",
        )
        if not runs.empty:
            best = f"metrics.{metric_key('best_val_accuracy')}"
            runs = runs.sort_values(best, ascending=False).head(top) if best in runs else runs.head(top)
    else:
        raise CifarError("give run ids or --experiment NAME.")
    if runs.empty:
        raise CifarError("no finished training runs to compare.")
    return runs


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: name, the recipe fields that differ between the runs, and the results."""
    skip = ("params.space.", "params.description", "params.name")
    params = [c for c in runs.columns if c.startswith("params.") and not c.startswith(skip)]
    differing = [c for c in params if runs[c].astype(str).nunique(dropna=False) > 1]
    table = pd.DataFrame({"run_id": runs["run_id"].str[:8], "run_name": runs.get("tags.mlflow.runName", "")})
    for column in differing:
        table[column.removeprefix("params.")] = runs[column]
    for metric, name in RESULT_COLUMNS.items():
        column = f"metrics.{metric_key(metric)}"
        if column in runs:
            table[name] = runs[column].round(4)
    return table.sort_values("val_accuracy", ascending=False) if "val_accuracy" in table else table


def learning_curves(runs: pd.DataFrame):
    from cifar.plots import Figure  # lazy: seaborn takes ~1.5 s; `compare --help` skips it

    client = _mlflow().MlflowClient()
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    for _, run in runs.iterrows():
        history = client.get_metric_history(run["run_id"], "val/accuracy")
        if history:
            label = f"{run.get('tags.mlflow.runName', '')} ({run['run_id'][:8]})"
            ax.plot([m.step for m in history], [m.value for m in history], "o-", ms=3, label=label)
    ax.set(title="Validation accuracy per epoch", xlabel="epoch", ylabel="val accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def compare(
    run_ids: list[str] | None = None, experiment: str | None = None, top: int = 10, out: Path | None = None
) -> tuple[pd.DataFrame, str]:
    mlflow = _mlflow()
    check_tracking_store()
    runs = find_runs(run_ids, experiment, top)
    table, figure = comparison_table(runs), learning_curves(runs)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "comparison.csv", index=False)
        figure.savefig(out / "learning_curves.png", dpi=100)
    mlflow.set_experiment("comparisons")
    with mlflow.start_run(run_name=f"compare {experiment or len(runs)}") as run:
        mlflow.set_tag("compared_runs", ",".join(runs["run_id"]))
        mlflow.log_text(table.to_csv(index=False), "comparison/comparison.csv")
        mlflow.log_text(
            table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False),
            "comparison/comparison.md",
        )
        mlflow.log_figure(figure, "comparison/learning_curves.png")
    return table, run.info.run_id


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401 (lazy: optional dependency; pandas' to_markdown needs it)
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_ids", nargs="*", metavar="RUN_ID")
    parser.add_argument("--experiment", help="compare the best runs of this MLflow experiment")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write comparison.csv and learning_curves.png here")
    args = parser.parse_args(argv)
    table, run_id = compare(args.run_ids or None, args.experiment, args.top, args.out)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False))
    print(f"Logged as run {run_id} (experiment 'comparisons').")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

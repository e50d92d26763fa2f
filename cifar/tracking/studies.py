"""The MLflow side of an Optuna study: one parent run shared by all workers, trial runs closed."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from cifar.tracking.names import metric_key
from cifar.tracking.store import TRIAL_RUN_ATTR, _mlflow


def close_run(run_id: str, status: str, tags: dict[str, str]) -> None:
    client = _mlflow().MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


def study_parent_run(study, attr: str, experiment: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """The one MLflow parent run of a study, shared by every worker through a study attribute.

    Under ``mlflow run -e tune`` the run it created is the parent. Two workers that start at
    once may both create one: the attribute decides, and the loser deletes its own.
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    existing = study.user_attrs.get(attr)
    if existing:
        try:
            client.get_run(existing)
            return existing
        except mlflow.exceptions.MlflowException:  # the study outlived its run (another store, deleted)
            print(
                f"The study's MLflow parent run {existing} is not in {mlflow.get_tracking_uri()}: starting a new one."
            )
    # Under `mlflow run` its run is the parent. Take the id out of the environment, or every
    # trial's start_run(parent_run_id=...) would resume that run instead of nesting under it.
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if not run_id:
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        run_id = client.create_run(experiment_id, run_name=f"{experiment}-study", tags=tags).info.run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    if study.user_attrs.get(attr) in (None, existing):
        study.set_user_attr(attr, run_id)
    time.sleep(0.5)
    winner = study.user_attrs.get(attr)
    if winner != run_id:
        client.delete_run(run_id)
    return winner


def summarize_study(study, parent_run_id: str, evaluator=None, evaluator_name: str = "") -> None:
    """Best trial (value, params) and Optuna's plots (matplotlib, offline) on the parent run.

    ``evaluator`` is the importance evaluator the importance plot uses; its title names it.
    """
    import matplotlib  # lazy: the slim app venv has no matplotlib (nor optuna)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: the slim app venv has no matplotlib
    import optuna.visualization.matplotlib as ovm  # lazy: the slim app venv has no optuna

    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    client.log_batch(
        parent_run_id,
        metrics=[
            mlflow.entities.Metric(f"trials/{state.lower()}", states.count(state), int(time.time() * 1000), 0)
            for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
        ],
    )
    completed = [t for t, state in zip(trials, states, strict=True) if state == "COMPLETE"]
    if completed:
        best = study.best_trial
        client.log_metric(parent_run_id, metric_key("best_val_accuracy"), best.value)
        client.set_tag(parent_run_id, "best_trial", str(best.number))
        client.set_tag(  # the run page's Description
            parent_run_id,
            "mlflow.note.content",
            f"Optuna study **{study.study_name}**: {states.count('COMPLETE')} trials complete, "
            f"{states.count('PRUNED')} pruned, {states.count('FAIL')} failed; each trial is a child run. "
            f"Best: trial {best.number}, validation accuracy {best.value:.4f}, with "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
            + ". Plots in optuna/; `make dashboard` shows the study in optuna-dashboard.",
        )
        if best.user_attrs.get(TRIAL_RUN_ATTR):
            client.set_tag(parent_run_id, "best_run_id", best.user_attrs[TRIAL_RUN_ATTR])
        client.log_dict(
            parent_run_id, {"number": best.number, "value": best.value, "params": best.params}, "optuna/best_trial.json"
        )
    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": lambda s: ovm.plot_param_importances(s, evaluator=evaluator),
        "parallel_coordinate": ovm.plot_parallel_coordinate,
        "slice": ovm.plot_slice,
        "intermediate_values": ovm.plot_intermediate_values,
    }
    for name, plot in plots.items():
        if not completed:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances need varied params
            continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        if name == "param_importances" and evaluator_name:
            # Optuna titles it on the left; the evaluator changed default in 5.0, so the title names it
            first.set_title(f"Hyperparameter importances ({evaluator_name.replace('_', '-')} evaluator)", loc="left")
        figure = first.figure
        figure.set_size_inches(max(figure.get_size_inches()[0], 9), max(figure.get_size_inches()[1], 5))
        client.log_figure(parent_run_id, figure, f"optuna/{name}.png", save_kwargs={"bbox_inches": "tight"})
        plt.close(figure)
    if not any(state == "RUNNING" for state in states):
        client.set_terminated(parent_run_id, "FINISHED")

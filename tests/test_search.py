"""tune.py: the space is checked, the study and MLflow agree, pruning, parallel and killed workers."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import PYTHON, ROOT, clean_env, run_cli

from cifar.config import load_experiment
from cifar.errors import CifarError
from cifar.search import load_space, suggest

SPACE = {
    "sampler": {"name": "tpe", "startup_trials": 2},
    "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 0},
    "params": {
        "optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
        "train.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
        "augment.translate": {"type": "int", "low": 0, "high": 3},
    },
}


# Every deprecation is an error in these tune runs (Optuna's RetryFailedTrialCallback would be one),
# but for one inside MLflow 3.17.2's own tables under SQLAlchemy 2.1, which this project cannot change.
DEPRECATIONS_ARE_ERRORS = [
    *("-W", "error::DeprecationWarning", "-W", "error::PendingDeprecationWarning", "-W", "error::FutureWarning"),
    *("-W", "ignore:The ``noload`` loader strategy:DeprecationWarning"),
]


def write_space(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.parametrize(
    "params, message",
    [
        ({"optim.lrr": {"type": "float", "low": 0.1, "high": 1}}, "'optim.lrr' is not a recipe field"),
        ({"optim.lr": {"type": "float", "low": 1, "high": 1}}, "empty or inverted range"),
        ({"optim.lr": {"type": "float", "low": 2, "high": 1}}, "empty or inverted range"),
        ({"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "low must be positive"),
        ({"train.batch_size": {"type": "categorical", "choices": []}}, "has no choices"),
        ({"optim.lr": {"type": "beta", "low": 0, "high": 1}}, "needs type"),
        ({"optim.lr": {"type": "float", "low": 0.1, "high": 1, "condition": {"model.width": 1}}}, "not searched"),
    ],
)
def test_bad_spaces(tmp_path, params, message):
    with pytest.raises(CifarError, match=message):
        load_space(str(write_space(tmp_path, {"params": params})), load_experiment("smoke"))


def test_sampler_settings_are_checked_and_stated(tmp_path):
    base = load_experiment("smoke")
    for sampler, message in (
        ({"name": "cmaes"}, "unknown sampler 'cmaes'"),
        ({"name": "tpe", "multivariat": True}, "has no setting multivariat"),
        ({"name": "tpe", "constant_liar": "yes"}, "constant_liar must be bool"),
    ):
        with pytest.raises(CifarError, match=message):
            load_space(str(write_space(tmp_path, {**SPACE, "sampler": sampler})), base)
    with pytest.raises(CifarError, match="importance must be one of"):
        load_space(str(write_space(tmp_path, {**SPACE, "importance": "shap"})), base)
    shipped = yaml.safe_load((ROOT / "experiments" / "search" / "cpu.yaml").read_text())
    assert set(shipped["sampler"]) == {"name", "startup_trials", "multivariate", "group", "constant_liar"}
    settings = load_space("cpu", load_experiment("cpu")).sampler
    assert settings == {"name": "tpe", **shipped["sampler"]}
    from cifar.search import make_sampler

    tpe = make_sampler({**settings, "constant_liar": False}, seed=0)  # Optuna 5's default is True
    assert (tpe._multivariate, tpe._group, tpe._constant_liar, tpe._n_startup_trials) == (True, True, False, 5)


def test_shipped_cpu_space_loads():
    space = load_space("cpu", load_experiment("cpu"))
    names = {p.name for p in space.params}
    assert {
        "optim.lr",
        "optim.weight_decay",
        "train.label_smoothing",
        "train.batch_size",
        "model.width",
        "train.epochs",
        "augment.translate",
    } <= names


def test_conditions_are_honoured(tmp_path):
    space = load_space(
        str(
            write_space(
                tmp_path,
                {
                    "params": {
                        "optim.name": {"type": "categorical", "choices": ["sgd", "adamw"]},
                        "optim.momentum": {
                            "type": "float",
                            "low": 0.8,
                            "high": 0.95,
                            "condition": {"optim.name": "sgd"},
                        },
                    }
                },
            )
        ),
        load_experiment("smoke"),
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [suggest(study.ask(), space) for _ in range(30)]
    assert all(("optim.momentum" in d) == (d["optim.name"] == "sgd") for d in drawn)
    assert {d["optim.name"] for d in drawn} == {"sgd", "adamw"}


def tune(tmp_path, prepared_dir, *args, space=SPACE, wait=True):
    env = clean_env(
        {
            "PYTHONPATH": str(ROOT),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "CIFAR_DATA": str(prepared_dir),
        }
    )
    command = [
        PYTHON,
        *DEPRECATIONS_ARE_ERRORS,
        str(ROOT / "tune.py"),
        "--experiment",
        "smoke",
        "--space",
        str(write_space(tmp_path, space)),
        "--storage",
        f"sqlite:///{tmp_path / 'optuna.db'}",
        "--study-name",
        "s",
        "--epochs-per-trial",
        "2",
        *args,
    ]
    process = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return process
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


def mlflow_runs(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("s")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def load(tmp_path):
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


@pytest.mark.integration
@pytest.mark.slow
def test_search_study_and_mlflow_agree(tmp_path, prepared_dir):
    out = tune(tmp_path, prepared_dir, "--n-trials", "4", space={**SPACE, "pruner": {"name": "none"}})
    assert "trial   3" in out and "ETA" in out and "Best trial" in out
    study = load(tmp_path)
    assert len(study.trials) == 4
    client, parents, children = mlflow_runs(tmp_path)
    (parent,) = parents
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_trial = {int(c.data.tags["optuna_trial"]): c for c in children}
    assert sorted(by_trial) == [t.number for t in study.trials]
    for trial in study.trials:
        run = by_trial[trial.number]
        assert run.data.tags["trial_state"] == trial.state.name
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        if trial.state.name == "COMPLETE":
            assert run.data.metrics["val/best_accuracy"] == pytest.approx(trial.value)
            assert run.data.tags.get("model_uri", "").startswith("models:/")
            assert float(run.data.params["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["val/best_accuracy"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.params["study_name"] == "s" and parent.data.params["space.optim.lr"].startswith("float[")
    # the sampler's settings, stated or defaulted by the space file, and the importance evaluator
    params = parent.data.params
    assert (params["sampler"], params["sampler.startup_trials"], params["sampler.multivariate"]) == (
        "TPESampler",
        "2",
        "True",
    )
    assert (params["sampler.group"], params["sampler.constant_liar"]) == ("True", "True")
    assert params["importance_evaluator"] == "ped_anova"
    assert parent.data.tags["optuna_storage"].endswith("optuna.db")
    import mlflow
    from PIL import Image

    plots = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="optuna", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"
    )
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "slice"):
        with Image.open(f"{plots}/{name}.png") as image:
            assert image.size[0] > 400 and image.size[1] > 200

    # Resuming the same study adds trials to it, under the same parent run.
    tune(tmp_path, prepared_dir, "--n-trials", "1", space={**SPACE, "pruner": {"name": "none"}})
    assert len(load(tmp_path).trials) == 5
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 5


@pytest.mark.integration
@pytest.mark.slow
def test_a_hopeless_trial_is_pruned(tmp_path, prepared_dir):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    study.enqueue_trial({"optim.lr": 0.05, "train.label_smoothing": 0.0, "augment.translate": 0})
    study.enqueue_trial({"optim.lr": 0.01, "train.label_smoothing": 0.0, "augment.translate": 0})
    space = {
        **SPACE,
        "params": {**SPACE["params"], "optim.lr": {"type": "float", "low": 1e-7, "high": 0.1, "log": True}},
    }
    study.enqueue_trial({"optim.lr": 1e-7, "train.label_smoothing": 0.0, "augment.translate": 0})
    tune(tmp_path, prepared_dir, "--n-trials", "3", "--epochs-per-trial", "3", space=space)
    states = {t.number: t.state.name for t in load(tmp_path).trials}
    assert states[0] == "COMPLETE" and states[2] == "PRUNED"
    _, _, children = mlflow_runs(tmp_path)
    pruned = next(c for c in children if c.data.tags["optuna_trial"] == "2")
    assert pruned.data.tags["trial_state"] == "PRUNED" and pruned.info.status == "KILLED"
    assert len(list(pruned.data.metrics)) < len(
        next(c for c in children if c.data.tags["optuna_trial"] == "0").data.metrics
    )


@pytest.mark.integration
@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, prepared_dir):
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    workers = [tune(tmp_path, prepared_dir, "--n-trials", "3", wait=False) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    study = load(tmp_path)
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6  # no duplicated points
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1, "both workers log under one parent run"
    assert sorted(int(c.data.tags["optuna_trial"]) for c in children) == list(range(6))


@pytest.mark.integration
@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried(tmp_path, prepared_dir):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    beat = ["--heartbeat-interval", "1", "--grace-period", "3"]
    worker = tune(tmp_path, prepared_dir, "--n-trials", "1", "--epochs-per-trial", "200", *beat, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trials = load(tmp_path).trials
        if trials and trials[0].state.name == "RUNNING" and trials[0].user_attrs.get("mlflow_run_id"):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the first worker never started a trial")
    time.sleep(2)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    time.sleep(4)  # past the grace period
    tune(tmp_path, prepared_dir, "--n-trials", "1", *beat)
    study = load(tmp_path)
    assert study.trials[0].state.name == "FAIL"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state.name in ("COMPLETE", "PRUNED")
    assert retried[0].params == study.trials[0].params
    client, _, children = mlflow_runs(tmp_path)
    killed = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert killed.info.status == "FAILED" and killed.data.tags["trial_state"] == "FAIL"


@pytest.mark.integration
def test_bad_inputs_are_clear(tmp_path, prepared_dir):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CIFAR_DATA": str(prepared_dir)}
    bad_space = write_space(tmp_path, {"params": {"optim.nope": {"type": "float", "low": 0, "high": 1}}})
    cases = [
        (["--space", str(bad_space)], "'optim.nope' is not a recipe field"),
        (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open Optuna storage"),
        (["--storage", "notadb://x"], "cannot open Optuna storage"),
        (["--experiment", "nope"], "unknown experiment 'nope'"),
    ]
    optuna.create_study(study_name="down", storage=f"sqlite:///{tmp_path / 'o.db'}", direction="minimize")
    cases.append(
        (
            ["--study-name", "down", "--storage", f"sqlite:///{tmp_path / 'o.db'}", "--space", "cpu"],
            "already exists and minimizes",
        )
    )
    for args, message in cases:
        result = run_cli(
            [str(ROOT / "tune.py"), "--experiment", "smoke", "--space", "cpu", *args], env=env, cwd=tmp_path
        )
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_study_whose_parent_run_vanished_gets_a_new_one(tracking_env):
    from cifar.search import PARENT_ATTR
    from cifar.tracking import study_parent_run

    study = optuna.create_study(direction="maximize")
    study.set_user_attr(PARENT_ATTR, "0" * 32)  # e.g. the study file was copied from another machine
    new = study_parent_run(study, PARENT_ATTR, "s", {"study_name": "s"}, {"optuna_study": "s"})
    assert new != "0" * 32 and study.user_attrs[PARENT_ATTR] == new
    import mlflow

    assert mlflow.MlflowClient().get_run(new).data.tags["optuna_study"] == "s"
    assert study_parent_run(study, PARENT_ATTR, "s", {}, {}) == new  # reused from then on


@pytest.mark.integration
@pytest.mark.slow
def test_a_diverging_trial_fails_and_the_search_goes_on(tmp_path, prepared_dir):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    study.enqueue_trial({"optim.lr": 1e5, "train.label_smoothing": 0.0, "augment.translate": 0})
    study.enqueue_trial({"optim.lr": 0.05, "train.label_smoothing": 0.0, "augment.translate": 0})
    space = {
        **SPACE,
        "pruner": {"name": "none"},
        "params": {**SPACE["params"], "optim.lr": {"type": "float", "low": 0.01, "high": 1e5, "log": True}},
    }
    out = tune(tmp_path, prepared_dir, "--n-trials", "2", space=space)
    states = [t.state.name for t in load(tmp_path).trials]
    assert states == ["FAIL", "COMPLETE"], out
    client, _, children = mlflow_runs(tmp_path)
    failed = next(c for c in children if c.data.tags["optuna_trial"] == "0")
    assert failed.info.status == "FAILED" and "diverged" in failed.data.tags["error"]

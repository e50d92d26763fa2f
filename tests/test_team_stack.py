"""The team set-up for real: PostgreSQL 15 + ``mlflow server`` (proxied artifacts), tune workers on
PostgreSQL storage, registration and serving over HTTP, and a tracking server that goes away.

Needs PostgreSQL's server binaries (Debian ``postgresql``; ``make system-deps`` installs them).
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PYTHON, ROOT, clean_env, run_cli

from cifar.ops.localstack import MlflowServer, PostgresCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPACE = {
    "sampler": {"name": "tpe", "startup_trials": 2},
    "pruner": {"name": "none"},
    "params": {
        "optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
        "augment.translate": {"type": "int", "low": 0, "high": 3},
    },
}


def live_processes(marker: str) -> list[str]:
    """Command lines of live (not zombie) processes mentioning ``marker``."""
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and not line.lstrip().startswith("Z")]


@pytest.fixture(scope="module")
def stack():
    folder = Path(tempfile.mkdtemp(prefix="cifar-team-"))  # under /tmp: reachable by the postgres user
    timings = {}
    start = time.perf_counter()
    cluster = PostgresCluster(folder).start()
    try:
        mlflow_db, optuna_db = cluster.create_database("mlflow"), cluster.create_database("optuna")
        timings["postgres"] = time.perf_counter() - start
        server = MlflowServer(mlflow_db, folder / "artifacts", log=folder / "server.log")
        server.start()
        timings["mlflow_server"] = time.perf_counter() - start - timings["postgres"]
        yield {"cluster": cluster, "server": server, "optuna": optuna_db, "folder": folder, "timings": timings}
        server.stop()
    finally:
        cluster.stop()
    assert not live_processes(str(folder)), "a PostgreSQL process outlived the test"
    assert not live_processes(f"--port {server.port}"), "the MLflow server outlived the test"
    print("team stack timings (s):", {k: round(v, 1) for k, v in timings.items()})


def client_env(stack, prepared_dir, tmp_path) -> dict:
    return {"MLFLOW_TRACKING_URI": stack["server"].url, "CIFAR_DATA": str(prepared_dir), "CIFAR_OUTBOX": str(tmp_path)}


def test_train_tune_register_serve_through_the_server(stack, prepared_dir, tmp_path):
    import mlflow
    import optuna

    env = client_env(stack, prepared_dir, tmp_path / "outbox")
    timings = stack["timings"]
    started = time.perf_counter()
    trained = run_cli([str(ROOT / "train.py"), "--experiment", "smoke", "--epochs", "2"], env=env, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    timings["train"] = time.perf_counter() - started

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    optuna.create_study(study_name="team", storage=stack["optuna"], direction="maximize")
    tune = [
        PYTHON, str(ROOT / "tune.py"), "--experiment", "smoke", "--space", str(space), "--storage", stack["optuna"],
        "--study-name", "team", "--n-trials", "2", "--epochs-per-trial", "1",
    ]  # fmt: skip
    started = time.perf_counter()
    workers = [
        subprocess.Popen(
            [*tune, "--seed", str(i)],
            env=clean_env({"PYTHONPATH": str(ROOT), **env}),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    timings["two_tune_workers_4_trials"] = time.perf_counter() - started

    # The study and MLflow agree: every trial exactly once, as a child of one parent run.
    study = optuna.load_study(study_name="team", storage=stack["optuna"])
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    client = mlflow.MlflowClient(stack["server"].url)
    experiments = [client.get_experiment_by_name(name).experiment_id for name in ("smoke", "team")]
    runs = client.search_runs(experiments, max_results=100)  # the training run, the study's parent and trials
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [0, 1, 2, 3]
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    for trial in study.trials:
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics["val/best_accuracy"] == pytest.approx(
            trial.value
        )

    # Artifacts went through the server into its artifact folder, not to a path the client wrote.
    for run in runs:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    stored = {p.name for p in (stack["folder"] / "artifacts").rglob("*") if p.is_file()}
    assert {"model.safetensors", "model.onnx", "confusion_matrix.png", "experiment.yaml"} <= stored
    assert not (tmp_path / "mlruns").exists() and not list((tmp_path / "outbox").glob("*"))

    started = time.perf_counter()
    registered = run_cli([str(ROOT / "register.py"), "--study-name", "team"], env=env, cwd=tmp_path)
    assert registered.returncode == 0, registered.stdout + registered.stderr[-3000:]
    timings["register"] = time.perf_counter() - started

    # Load the production model over HTTP and predict real test images.
    from cifar.data import load_cache
    from cifar.serve.inference import Predictor

    mlflow.set_tracking_uri(stack["server"].url)
    try:
        predictor = Predictor.from_uri("models:/cifar10-classifier@production")
        version = client.get_model_version_by_alias("cifar10-classifier", "production")
    finally:
        mlflow.set_tracking_uri(None)
    data = load_cache(prepared_dir)
    images = np.asarray(data.images["test"])
    predicted = [p.label for p in predictor.predict_arrays(images)]
    accuracy = float(np.mean([label == data.classes[i] for label, i in zip(predicted, data.labels["test"])]))
    assert version.run_id in {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert accuracy == pytest.approx(float(version.tags["test_accuracy"]), abs=0.011)


def read_until(process: subprocess.Popen, fragment: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if fragment in line:
            return lines
    raise AssertionError(f"never printed {fragment!r}:\n{''.join(lines)[-3000:]}")


@pytest.mark.parametrize("back_before_the_end", [True, False], ids=["server-returns", "sync-afterwards"])
def test_training_survives_the_server_going_away(stack, prepared_dir, tmp_path, back_before_the_end):
    import mlflow

    server: MlflowServer = stack["server"]
    epochs = 40 if back_before_the_end else 6
    env = clean_env({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **client_env(stack, prepared_dir, tmp_path)})
    process = subprocess.Popen(
        [PYTHON, "train.py", "--experiment", "smoke", "--epochs", str(epochs), "--run-name", "outage"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        read_until(process, f"epoch   2/{epochs}")
        server.stop()
        if back_before_the_end:
            read_until(process, "warning: cannot reach the tracking server")
            process.send_signal(signal.SIGSTOP)  # training waits while the server restarts (however slowly)
            server.start()
            process.send_signal(signal.SIGCONT)
        out, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
        if server.proc is None:
            server.start()
    assert process.returncode == 0, out[-3000:]
    assert out.count("warning: cannot reach the tracking server") <= 1, "the outage is reported once, not per epoch"
    (run_id,) = [p.name for p in tmp_path.iterdir() if p.is_dir()] or [None]
    if back_before_the_end:
        assert run_id is None, "everything went up when the server came back: the outbox is empty"
    else:
        assert "warning: cannot reach the tracking server" in out and "python -m cifar sync" in out
        synced = run_cli(["-m", "cifar.promote.sync", "--outbox", str(tmp_path)], env={"CIFAR_DATA": str(prepared_dir)})
        assert synced.returncode == 0 and f"uploaded {run_id}" in synced.stdout, synced.stdout + synced.stderr
        assert not (tmp_path / run_id).exists()

    client = mlflow.MlflowClient(server.url)
    experiment = client.get_experiment_by_name("smoke")
    (run,) = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'outage'", max_results=5) or [None]
    client.delete_run(run.info.run_id)  # the other case searches by the same name
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1)), "every epoch once, none lost"
    assert "test/accuracy" in run.data.metrics and run.data.tags["model_uri"].startswith("models:/")
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation", "weights", "plots", "tensorboard"} <= names
    mlflow.set_tracking_uri(server.url)
    try:
        from cifar.serve.inference import Predictor

        assert Predictor.from_uri(run.data.tags["model_uri"]).metadata["run_id"] == run.info.run_id
    finally:
        mlflow.set_tracking_uri(None)


def test_a_killed_worker_trial_is_retried_on_postgres(stack, prepared_dir, tmp_path):
    """A tuning machine dies mid-trial (SIGKILL): heartbeats mark the trial failed, another worker retries it."""
    import signal

    import mlflow
    import optuna

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    storage = stack["optuna"]
    optuna.create_study(study_name="killed", storage=storage, direction="maximize")
    command = [
        PYTHON, str(ROOT / "tune.py"), "--experiment", "smoke", "--space", str(space), "--storage", storage,
        "--study-name", "killed", "--n-trials", "1", "--heartbeat-interval", "1", "--grace-period", "3",
    ]  # fmt: skip
    env = clean_env({"PYTHONPATH": str(ROOT), **client_env(stack, prepared_dir, tmp_path)})
    doomed = subprocess.Popen([*command, "--epochs-per-trial", "300"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trials = optuna.load_study(study_name="killed", storage=storage).trials
        if trials and trials[0].state.name == "RUNNING" and trials[0].user_attrs.get("mlflow_run_id"):
            break
        time.sleep(0.5)
    else:
        doomed.kill()
        pytest.fail("the first worker never started a trial")
    time.sleep(2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    time.sleep(4)  # past the grace period
    survivor = subprocess.run([*command, "--epochs-per-trial", "1"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
    assert survivor.returncode == 0, survivor.stderr[-3000:]
    study = optuna.load_study(study_name="killed", storage=storage)
    assert study.trials[0].state.name == "FAIL"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == study.trials[0].params
    killed = mlflow.MlflowClient(stack["server"].url).get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert killed.info.status == "FAILED"

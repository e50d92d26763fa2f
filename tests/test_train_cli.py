"""Bad input to train.py: one clear message naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import pytest
from conftest import ROOT, run_cli

pytestmark = pytest.mark.integration


def assert_clear_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--experiment", "nope"], ["unknown experiment 'nope'", "cpu"]),
        (["--set", "model.name=vit"], ["unknown model 'vit'", "fastnet"]),
        (["--set", "optim.lrr=0.1"], ["unknown field 'optim.lrr'"]),
        (["--set", "train.epochs=ten"], ["'train.epochs' must be int"]),
        (["--config", "missing.yaml"], ["config file 'missing.yaml' does not exist"]),
        (["--device", "tpu"], ["unknown device 'tpu'"]),
        (["--time-budget", "-5"], ["train.time_budget must be 0 (off) or seconds"]),
    ],
)
def test_bad_arguments(tmp_path, prepared_dir, args, fragments):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CIFAR_DATA": str(prepared_dir)}
    assert_clear_error(run_cli([str(ROOT / "train.py"), *args, "--no-progress"], env=env, cwd=tmp_path), *fragments)


def test_missing_data_with_a_bad_source(tmp_path):
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "CIFAR_DATA": str(tmp_path / "data"),
        "CIFAR_SOURCE": str(tmp_path / "no-such-archive.tar.gz"),
    }
    result = run_cli([str(ROOT / "train.py"), "--experiment", "smoke"], env=env, cwd=tmp_path)
    assert_clear_error(result, "no-such-archive.tar.gz", "does not exist")


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ({"args": ["--save-dir", "{blocker}/out"]}, "cannot write the output folder"),
        ({"env": {"CIFAR_CHECKPOINTS": "{blocker}/checkpoints"}}, "cannot write the checkpoint folder"),
        ({"env": {"CIFAR_OUTBOX": "{blocker}/outbox"}}, "cannot write the tracking outbox"),
        ({"experiment_artifacts": "{blocker}/artifacts"}, "cannot write the artifact store"),
    ],
    ids=["save-dir", "checkpoints", "outbox", "artifact-store"],
)
def test_unwritable_folders_fail_at_once(tmp_path, prepared_dir, setting, fragment):
    """A folder that cannot be created (its parent is a file; root ignores permissions) fails before training."""
    import mlflow

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "CIFAR_DATA": str(prepared_dir)}
    env.update({k: v.format(blocker=blocker) for k, v in setting.get("env", {}).items()})
    args = [a.format(blocker=blocker) for a in setting.get("args", [])]
    if "experiment_artifacts" in setting:
        mlflow.set_tracking_uri(uri)
        try:
            location = (tmp_path / setting["experiment_artifacts"].format(blocker=blocker)).as_uri()
            mlflow.create_experiment("blocked", artifact_location=location)
        finally:
            mlflow.set_tracking_uri(None)
        args += ["--mlflow-experiment", "blocked"]
    cmd = [str(ROOT / "train.py"), "--experiment", "smoke", "--epochs", "1", "--no-progress", *args]
    result = run_cli(cmd, env=env, cwd=tmp_path)
    assert_clear_error(result, fragment, str(blocker))
    assert "epoch" not in result.stdout  # reported before any training
    if "experiment_artifacts" in setting:
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("blocked").experiment_id])
        assert [r.info.status for r in runs] == ["FAILED"]  # not left RUNNING


def test_a_time_budget_chooses_the_epochs_here_and_training_ends_within_it(tmp_path, prepared_dir):
    """--time-budget: a few steps timed on this machine fix train.epochs; the run logs the plan and why."""
    import math

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "CIFAR_DATA": str(prepared_dir), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    result = run_cli(
        # --epochs asks for far more than 12 s hold, so a plan of any size (1 on a loaded machine) is the budget's
        [str(ROOT / "train.py"), "--experiment", "smoke", "--epochs", "1000", "--time-budget", "12", "--no-progress"],
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Time budget: 12 s budget:" in result.stdout
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    tags, params = run.data.tags, run.data.params
    epochs = int(tags["budget.epochs"])
    assert params["train.epochs"] == str(epochs) and params["train.time_budget"] == "12.0"  # the plan, not --epochs
    # The deadline may move the last epoch mid-run (here per-epoch costs outside the steps, which the
    # probe does not see, are most of an epoch): the run then says so, and ran that many.
    ran = int(tags.get("budget.epochs_run", epochs))  # written when the deadline moved the plan
    moves = [m for m in tags.get("budget.replans", "").split("; ") if m]
    # each move starts where the one before ended; the last ends at the epochs that ran (none: the plan ran)
    ends = [epochs] + [int(m.split(" -> ")[1].split(" ")[0]) for m in moves]
    assert ends[-1] == ran and all(f"{a} -> {b} " in m for a, b, m in zip(ends, ends[1:], moves)), moves
    assert epochs < 1000 and len(client.get_metric_history(run.info.run_id, "train/loss")) == ran  # not --epochs
    assert f"of {ran})" in tags["mlflow.note.content"]  # the description names the epochs that ran
    assert run.info.run_name == "smoke-small_cnn-12s-s0"  # named by its budget: the deadline may move its epochs
    probe = float(tags["budget.reason"].split(": ")[1].split(" s ")[0])
    steps = int(tags["budget.steps"]) // epochs
    step_s = float(tags["budget.step_ms"]) / 1000
    assert epochs <= math.floor((12 - probe) / (steps * step_s))  # what fitted by its own measurement
    # How close a real run comes to its budget is a benchmark figure (benchmarks/RESULTS.md), not a
    # timed test: on this 400-image fixture per-epoch costs outside the steps (checkpoints, logging)
    # are most of an epoch, and a loaded CI machine runs slower than its own probe.


def test_a_recipe_trains_with_the_values_it_gives_this_kind_of_machine(tmp_path, prepared_dir):
    """A recipe's ``devices:`` section: train.py applies this machine's entry; --set still wins over it."""
    import mlflow
    import torch
    import yaml

    from cifar.engine import device_kind

    recipe = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    recipe["devices"] = {"cuda": {"train": {"batch_size": 40}}, "cpu_bf16": {"train": {"batch_size": 32}},
                         "cpu_fp32": {"train": {"batch_size": 25}, "optim": {"lr": 0.02}}}  # fmt: skip
    path = tmp_path / "by_device.yaml"
    path.write_text(yaml.safe_dump(recipe))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "CIFAR_DATA": str(prepared_dir), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    # --device cpu: this CPU's kind, also on a machine with a GPU
    result = run_cli(
        [str(ROOT / "train.py"), "--config", str(path), "--epochs", "1", "--set", "optim.lr=0.03", "--no-progress",
         "--device", "cpu"],
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("by_device").experiment_id])
    expected = {"cuda": "40", "cpu_bf16": "32", "cpu_fp32": "25"}[device_kind(torch.device("cpu"))]
    assert run.data.params["train.batch_size"] == expected and run.data.tags["device"] == "cpu"
    assert run.data.params["optim.lr"] == "0.03"  # the command line over the machine's entry

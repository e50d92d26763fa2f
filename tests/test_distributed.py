"""torchrun + DistributedDataParallel on CPU (gloo, 2 processes): one MLflow run, same result."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import mlflow
import psutil
import pytest
from conftest import PYTHON, ROOT, clean_env, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# --device cpu: gloo on CPU even where there are GPUs (auto would give each rank a GPU of its own).
RECIPE = ["--experiment", "smoke", "--epochs", "4", "--set", "train.batch_size=64", "--set", "train.seed=3",
          "--device", "cpu"]  # fmt: skip


def runs(uri: str):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("smoke")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])


def test_torchrun_two_processes_match_one(tmp_path, prepared_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "CIFAR_DATA": str(prepared_dir), "CIFAR_OUTBOX": str(tmp_path / "outbox")}
    single = run_cli([str(ROOT / "train.py"), *RECIPE, "--run-name", "single"], env=env, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *RECIPE,
         "--run-name", "ddp"],
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    assert ddp.stdout.count("test accuracy") == 1, "only rank 0 reports"

    client, (one, two) = runs(uri)
    assert [r.data.tags["mlflow.runName"] for r in (one, two)] == ["single", "ddp"], "one run per training"
    assert one.data.tags["world_size"] == "1" and two.data.tags["world_size"] == "2"
    assert two.info.status == "FINISHED" and two.data.tags["model_uri"].startswith("models:/")
    steps = [m.step for m in client.get_metric_history(two.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4], "each epoch logged once, by rank 0"
    # Same global batch, seed, order and augmentation: the ranks' half-batches add up to the
    # single process's batch; only BatchNorm statistics (per half-batch) and summation order differ.
    # (Measured: train loss 1.858 vs 1.872, test accuracy 0.210 vs 0.235 on 200 images.)
    assert two.data.metrics["train/loss"] == pytest.approx(one.data.metrics["train/loss"], abs=0.03)
    for key in ("val/best_accuracy", "test/accuracy"):
        assert two.data.metrics[key] == pytest.approx(one.data.metrics[key], abs=0.05), key


def test_torchrun_keeps_training_after_the_whitening_stem_freezes(tmp_path, prepared_dir):
    # Freezing a parameter that DDP expects gradients for would stall its reducer; fit re-wraps.
    recipe = ["--experiment", "smoke", "--epochs", "2", "--no-track", "--no-progress", "--device", "cpu"]
    for setting in ("model.name=fastnet", "model.width=0.25", "train.whiten_bias_epochs=1", "train.lookahead=true"):
        recipe += ["--set", setting]
    ddp = run_cli(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *recipe],
        env={"CIFAR_DATA": str(prepared_dir)},
        cwd=tmp_path,
    )
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    assert "epoch   2/2" in ddp.stdout and ddp.stdout.count("test accuracy") == 1


def test_torchrun_tune_trials_train_on_both_ranks(tmp_path, prepared_dir):
    import optuna
    import yaml

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "sampler": {"name": "random"},
                "pruner": {"name": "none"},
                "params": {"optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
            }
        )
    )
    env = {"MLFLOW_TRACKING_URI": uri, "CIFAR_DATA": str(prepared_dir), "CIFAR_OUTBOX": str(tmp_path / "outbox")}
    result = run_cli(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "tune.py"),
         "--experiment", "smoke", "--space", str(space), "--storage", storage, "--study-name", "ddp",
         "--n-trials", "2", "--epochs-per-trial", "2", "--seed", "0", "--device", "cpu"],
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("Best trial") == 1, "only rank 0 runs the study"
    study = optuna.load_study(study_name="ddp", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    trials = [r for r in runs if "optuna_trial" in r.data.tags]
    assert sorted(r.data.tags["optuna_trial"] for r in trials) == ["0", "1"]
    assert all(r.data.tags["world_size"] == "2" and r.info.status == "FINISHED" for r in trials)


def test_each_rank_trains_on_its_own_share_of_every_batch(tmp_path, prepared_dir):
    """The rows each rank's model receives: disjoint halves that add up to the global batch."""
    result = run_cli(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "tests" / "ddp_batch_rows.py"),
        ],
        env={"CIFAR_DATA": str(prepared_dir), "OUT": str(tmp_path)},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    batches = ranks[0]["global"]
    assert batches == ranks[1]["global"] and len(batches) == 400 // 64  # both ranks draw the same batches
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == len(batches)
    for step, whole in enumerate(batches):
        mine, theirs = ranks[0]["steps"][step], ranks[1]["steps"][step]
        assert len(mine) == len(theirs) == len(whole) // 2, step
        assert not set(mine) & set(theirs), f"step {step}: the ranks share rows"
        assert sorted(mine + theirs) == sorted(whole), f"step {step}: the halves are not the global batch"


def test_ranks_with_different_deadlines_end_at_rank_0s_epoch(tmp_path, prepared_dir):
    """A time budget's mid-run move of the last epoch: rank 0 decides for all (a rank going on alone would hang)."""
    result = run_cli(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "ddp_deadline.py")],
        env={"CIFAR_DATA": str(prepared_dir), "OUT": str(tmp_path)},
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Rank 0's deadline had passed: one more epoch after the first, then stop; rank 1 (a day to go) follows.
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == [1, 2]
    assert ranks[0]["replans"] == ranks[1]["replans"] and "4 -> 2 epochs" in ranks[1]["replans"][0]


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, prepared_dir):
    """Rank 1 alone gets SIGTERM; the ranks vote, both stop after the same step, rank 0 saves the checkpoint."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = clean_env(
        {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, "CIFAR_DATA": str(prepared_dir),
         "CIFAR_OUTBOX": str(tmp_path / "outbox"), "CIFAR_CHECKPOINTS": str(tmp_path / "checkpoints"),
         "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    )  # fmt: skip
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
             "--experiment", "smoke", "--epochs", "60", "--set", "train.checkpoint_every=0", "--no-progress",
             "--device", "cpu"],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline = time.time() + 240
            while "epoch   2/60" not in log.read_text():
                assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            rank1 = next(p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == "1")
            rank1.send_signal(signal.SIGTERM)
            launcher.wait(timeout=120)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    text = log.read_text()
    main = re.search(r"Stopped at epoch (\d+), step (\d+); checkpoint", text)
    other = re.search(r"rank 1: stopped at epoch (\d+), step (\d+)", text)
    assert main and other, text[-3000:]
    assert main.groups() == other.groups()
    assert int(main.group(1)) < 60, "stopped mid-run, not at the end"
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert run.info.status == "KILLED"
    assert any(a.path == "checkpoint" for a in client.list_artifacts(run.info.run_id))

"""Interrupted training: SIGTERM saves a checkpoint, --resume continues bit-identically; checkpoints
are data (a planted pickle runs nothing), and a failing disk leaves no corrupt checkpoint."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys

import mlflow
import pytest
import torch
from conftest import PYTHON, ROOT, clean_env, run_cli
from safetensors.torch import load_file

from cifar.errors import CifarError
from cifar.run.checkpoint import load_checkpoint, save_checkpoint

RECIPE = [
    "--experiment", "smoke", "--epochs", "3", "--seed", "1",
    "--set", "train.batch_size=8", "--set", "train.deterministic=true", "--device", "cpu",
]  # fmt: skip  (bit-identical resumes are a CPU promise: cuDNN's kernels may differ run to run)


def env_for(tmp_path, prepared_dir) -> dict:
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "CIFAR_DATA": str(prepared_dir),
        "CIFAR_CHECKPOINTS": str(tmp_path / "checkpoints"),
        "CIFAR_OUTBOX": str(tmp_path / "outbox"),
    }


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, prepared_dir):
    env = env_for(tmp_path, prepared_dir)
    reference = run_cli(["train.py", *RECIPE, "--no-track", "--save-dir", str(tmp_path / "ref")], env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]

    process = subprocess.Popen(
        [PYTHON, "train.py", *RECIPE, "--run-name", "interrupted"],
        cwd=ROOT, env=clean_env({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch   1/3"):
            process.send_signal(signal.SIGTERM)  # a real signal, mid-way through epoch 2
            break
    out = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 130, out[-3000:]
    assert "SIGTERM: stopping after this step" in out and "Resume with: python train.py --resume " in out
    run_id = out.split("--resume ")[1].split()[0]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/checkpoint.safetensors"]
    local = tmp_path / "checkpoints" / run_id / "checkpoint.safetensors"
    _, info = load_checkpoint(local)
    # mid-epoch: epoch 2, or 3 when a loaded machine delivered the signal after epoch 2's last step
    assert info["epoch"] in (2, 3) and 0 < info["step"] < 50, "stopped mid-epoch"
    local.unlink()  # resume from the copy logged to the run, as on another machine

    resumed = run_cli(
        ["train.py", "--resume", run_id, "--device", "cpu", "--save-dir", str(tmp_path / "resumed")], env=env
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"Resuming run {run_id} (smoke) at epoch 2, step {info['step']}" in resumed.stdout

    expected = load_file(tmp_path / "ref" / "model.safetensors")
    got = load_file(tmp_path / "resumed" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from the uninterrupted run"

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    for key in ("val/accuracy", "train/loss"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3], "no epoch lost or repeated"
    assert not (tmp_path / "checkpoints" / run_id).exists(), "a finished run's checkpoint is cleaned up"
    again = run_cli(["train.py", "--resume", run_id, "--device", "cpu"], env=env)
    assert again.returncode == 2 and "finished; there is nothing to resume" in again.stderr


class PlantsAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling this creates the file


@pytest.mark.integration
def test_a_planted_pickle_is_refused_and_runs_nothing(tmp_path, prepared_dir):
    env = env_for(tmp_path, prepared_dir)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = client.create_run(client.create_experiment("planted")).info.run_id
    marker = tmp_path / "pwned"
    for name, dump in (("pickle", pickle.dumps), ("torch.save", None)):
        planted = tmp_path / "checkpoints" / run_id / "checkpoint.safetensors"
        planted.parent.mkdir(parents=True, exist_ok=True)
        if dump:
            planted.write_bytes(dump(PlantsAFile(str(marker))))
        else:
            torch.save({"x": PlantsAFile(str(marker))}, planted)
        result = run_cli(["train.py", "--resume", run_id, "--device", "cpu"], env=env)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert "is a pickle (torch.save) file" in result.stderr and "Traceback" not in result.stderr, name
        assert not marker.exists(), f"the planted {name} ran"


def test_damaged_checkpoints_are_refused_with_the_reason(tmp_path):
    good = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.arange(1000.0)}, {"epoch": 1, "step": 0})
    data = good.read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "not a readable safetensors checkpoint"),
        "empty": (b"", "not a readable safetensors checkpoint"),
        "random": (bytes(range(256)) * 4, "not a readable safetensors checkpoint"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CifarError, match=message):
            load_checkpoint(path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "weights.safetensors"))  # model weights, not a checkpoint
    with pytest.raises(CifarError, match="not a cifar training checkpoint"):
        load_checkpoint(tmp_path / "weights.safetensors")
    assert load_checkpoint(good)[1] == {"epoch": 1, "step": 0}


FULL_DISK = """
import resource, signal, sys, torch
sys.path.insert(0, {root!r})
from cifar.run.checkpoint import save_checkpoint, load_checkpoint
from cifar.errors import CifarError
path = {path!r}
save_checkpoint(path, {{"w": torch.zeros(100)}}, {{"epoch": 1, "step": 0}})    # a good one first
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # writes past the limit fail with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    save_checkpoint(path, {{"w": torch.zeros(1_000_000)}}, {{"epoch": 2, "step": 0}})
except CifarError as exc:
    print("refused:", exc)
print("still:", load_checkpoint(path)[1])
"""


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "run" / "checkpoint.safetensors"
    code = FULL_DISK.format(root=str(ROOT), path=str(path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: could not write the checkpoint" in result.stdout and "previous checkpoint" in result.stdout
    assert "still: {'epoch': 1, 'step': 0}" in result.stdout
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.safetensors"], "no temporary file left behind"

"""What only a CUDA GPU exercises: the bf16 gate, DDP over NCCL, compiled CUDA steps, the speedrun recipe.

Marked ``gpu``: skipped without a CUDA device (conftest.py, and the summary says so); ``make test-gpu``
runs them with the GPU benchmarks.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli

from cifar.config import load_experiment
from cifar.data import load_cache
from cifar.engine import device_kind, evaluate, fit, native_bf16, seed_everything, train_step
from cifar.engine.loop import compiled_graphs
from cifar.engine.models import create_model

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def tracking_env(tmp_path, prepared_dir) -> dict:
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "CIFAR_DATA": str(prepared_dir),
        "CIFAR_OUTBOX": str(tmp_path / "outbox"),
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
    }


@pytest.mark.parametrize("capability", [None, (7, 5)], ids=["this-gpu", "as-turing"])
def test_bf16_autocast_exactly_where_the_gpu_has_native_bf16(monkeypatch, capability):
    """Compute capability 8+ (Ampere on) trains and evaluates under bf16 autocast; older GPUs
    (bf16 emulated, slower than fp32) in fp32. ``as-turing`` checks the gate's other side on any GPU."""
    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    bf16 = torch.cuda.get_device_capability(CUDA)[0] >= 8
    assert native_bf16(CUDA) is bf16 and device_kind(CUDA) == "cuda"
    model = create_model("small_cnn").to(CUDA)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    dtypes = []
    conv.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(8, 3, 32, 32, device=CUDA), torch.randint(0, 10, (8,), device=CUDA)
    loss, _ = train_step(model, optimizer, x, y, amp=True)
    train_step(model, optimizer, x, y, amp=False)  # the recipe's train.amp=false: fp32 whatever the GPU
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device=CUDA)
    evaluate(model, images, np.zeros(8, dtype=np.int64), device=CUDA, amp=True)
    autocast = torch.bfloat16 if bf16 else torch.float32
    assert dtypes == [autocast, torch.float32, autocast]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the loss is taken in fp32 either way


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_on_two_gpus_tests_and_calibrates_on_rank_0_only(tmp_path, prepared_dir):
    """Both ranks train, each on its own GPU; only rank 0 runs the test pass and calibration, once."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs for a 2-process torchrun; this machine has {torch.cuda.device_count()}")
    env = {**tracking_env(tmp_path, prepared_dir), "OUT": str(tmp_path)}
    result = run_cli(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "ddp_finalize.py"),
         "--experiment", "smoke", "--epochs", "2", "--set", "train.batch_size=64", "--device", "cuda", "--no-progress"],
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == {"exit": 0, "steps": [["train", "cuda:0"], ["test", "cuda:0"], ["calibrate", "cuda:0"]]}
    assert ranks[1] == {"exit": 0, "steps": [["train", "cuda:1"]]}
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.tags["device"].startswith("cuda:0 (") and "test/accuracy" in run.data.metrics


@pytest.mark.slow
def test_compiled_training_on_cuda_compiles_before_the_clock_and_never_inside_it(prepared_dir):
    """test_engine's compile check on CUDA (bf16 autocast, channels_last): the low-resolution epoch,
    the full-size ones and the frozen stem each get their graph in the warm-up, none in the timed loop."""
    data = load_cache(prepared_dir)
    cfg = load_experiment(
        "smoke",
        ["model.name=fastnet", "model.width=0.25", "train.batch_size=50", "optim.lr=0.05", "train.epochs=3",
         "train.low_res_epochs=1", "train.low_res=24", "train.whiten_bias_epochs=2", "train.compile=true"],
        device_kind="cuda",
    )  # fmt: skip
    assert cfg.train.amp and cfg.train.channels_last
    seed_everything(cfg.train.seed)
    model = create_model("fastnet", width=0.25, mean=data.mean, std=data.std)
    before = compiled_graphs()
    result = fit(model, data, cfg, CUDA)
    assert compiled_graphs() - before >= 3, "the warm-up compiled each of the three states"
    assert result.recompiles == 0 and result.compile_seconds > 0
    assert result.history[-1].train_loss < result.history[0].train_loss


@pytest.mark.slow
@pytest.mark.integration
def test_the_speedrun_recipe_learns_the_fixture_on_cuda(tmp_path, prepared_dir):
    """``train.py --experiment speedrun`` on the GPU, shortened to the fixture (400 training images,
    fewer than its 1,024 batch: 100 a step), tracked, exported, well above chance."""
    env = tracking_env(tmp_path, prepared_dir)
    result = run_cli(
        [str(ROOT / "train.py"), "--experiment", "speedrun", "--device", "cuda", "--epochs", "10",
         "--set", "train.batch_size=100", "--no-progress"],
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("speedrun").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["device"].startswith("cuda (")
    params, metrics = run.data.params, run.data.metrics
    assert (params["model.name"], params["model.width"], params["train.epochs"]) == ("fastnet", "1.0", "10")
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 10 and losses[-1] < losses[0]
    # The same on CPU in fp32, seeds 0-3: test accuracy 0.36-0.46, validation 0.45-0.48 (chance 0.10).
    assert metrics["test/accuracy"] > 0.25 and metrics["val/best_accuracy"] > 0.25
    assert metrics["export/onnx_max_abs_diff"] < 1e-3  # the served graph agrees with the GPU-trained model

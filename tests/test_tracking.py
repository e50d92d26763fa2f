"""A training run as users run it (``python train.py``), read back from a real SQLite MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def store(tmp_path_factory, mini_dir):
    """One tracked run of the smoke recipe; prepared on the fly from $CIFAR_SOURCE."""
    root = tmp_path_factory.mktemp("tracked")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "CIFAR_DATA": str(root / "data"),
        "CIFAR_SOURCE": str(mini_dir),
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # a sample a second: this run lasts seconds, not minutes
    }
    # --device cpu: the CPU run these tests read back, also on a machine with a GPU
    result = run_cli(
        [str(ROOT / "train.py"), "--experiment", "smoke", "--epochs", "4", "--run-name", "smoke-test", "--no-progress",
         "--device", "cpu"],
        env=env,
        cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("smoke")
    (run,) = client.search_runs([experiment.experiment_id])
    return {"root": root, "env": env, "client": client, "run": run, "stdout": result.stdout}


def test_run_finished_with_tags_and_params(store):
    run = store["run"]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke-test"
    tags, params = run.data.tags, run.data.params
    for tag in ("git_commit", "git_dirty", "experiment_file", "device", "torch_version", "data_source", "data_digest"):
        assert tags.get(tag), tag
    assert tags["device"] == "cpu" and tags["data_source"].endswith("cifar10-mini")
    assert params["model.name"] == "small_cnn" and params["train.epochs"] == "4"
    assert float(params["optim.lr"]) == 0.05 and params["train.seed"] == "0"
    assert (params["data.train_size"], params["data.val_size"], params["data.test_size"]) == ("450", "50", "200")


def test_per_epoch_and_final_metrics(store):
    client, run_id = store["client"], store["run"].info.run_id
    for key in (  # sections before "/" are how the MLflow UI groups a run's charts
        "train/loss",
        "train/accuracy",
        "val/loss",
        "val/accuracy",
        "train/learning_rate",
        "train/images_per_second",
        "train/epoch_seconds",
    ):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4], key
    metrics = store["run"].data.metrics
    val = [m.value for m in client.get_metric_history(run_id, "val/accuracy")]
    assert metrics["val/best_accuracy"] == max(val)
    assert val[int(metrics["val/best_epoch"]) - 1] == max(val)
    for key in ("test/accuracy", "test/loss", "train/seconds", "test/ece_calibrated", "ood/auroc_noise"):
        assert key in metrics
    assert metrics["export/onnx_max_abs_diff"] < 1e-4
    assert not [k for k in metrics if "/" not in k], "every metric has its section"
    note = store["run"].data.tags["mlflow.note.content"]  # the run page's Description
    assert f"validation accuracy {metrics['val/best_accuracy']:.4f}" in note
    assert f"test accuracy {metrics['test/accuracy']:.4f}" in note and "AUROC" in note


def test_system_metrics_are_sampled_while_the_run_trains(store):
    """MLflow's system metrics (its sampler thread, psutil): the run's System metrics tab is not empty."""
    client, run = store["client"], store["run"]
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and [m.step for m in cpu] == list(range(len(cpu)))
    assert all(0 <= m.value <= 100 for m in cpu)
    start, end = run.info.start_time, run.info.end_time
    assert all(start <= m.timestamp <= end + 1000 for m in cpu)
    memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert memory and all(m.value > 100 for m in memory)


def test_final_metrics_are_linked_to_the_logged_model(store):
    """MLflow 3's model view: the model carries its metrics, each with the split it was measured on."""
    import mlflow

    mlflow.set_tracking_uri(store["env"]["MLFLOW_TRACKING_URI"])
    run = store["run"]
    (model,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string="metrics.`val/best_accuracy` > 0",
        order_by=[{"field_name": "metrics.val/best_accuracy", "ascending": False}],
        output_format="list",
    )
    assert run.data.tags["model_uri"] == f"models:/{model.model_id}"
    linked = {m.key: m for m in model.metrics}
    for key in ("val/best_accuracy", "test/accuracy", "test/ece_calibrated", "ood/auroc_noise"):
        assert linked[key].value == pytest.approx(run.data.metrics[key]), key
    assert linked["val/best_accuracy"].dataset_name == "cifar10-val"
    assert linked["test/accuracy"].dataset_name == "cifar10-test"
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert linked["test/accuracy"].dataset_digest == inputs["cifar10-test"]
    assert "val/accuracy" not in linked  # per-epoch curves belong to the run, not to the model


def test_no_progress_still_reports_epochs_and_results(store):
    """--no-progress drops the per-step bar (for logs), never the epoch lines or the result."""
    out, test_accuracy = store["stdout"], store["run"].data.metrics["test/accuracy"]
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert f"test accuracy {test_accuracy:.4f}" in out
    assert "batch/s" not in out and "s/batch" not in out and "\r" not in out


def test_dataset_lineage(store):
    inputs = store["run"].inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_context) == {"training", "validation", "testing"}
    digest = store["run"].data.tags["data_digest"]
    assert all(d.digest.startswith(digest[:10]) for d in by_context.values())
    assert by_context["training"].name == "cifar10-train"


def test_artifacts(store):
    client, run_id = store["client"], store["run"].info.run_id
    listed = {
        a.path for folder in ("config", "plots", "evaluation", "weights") for a in client.list_artifacts(run_id, folder)
    }
    assert {
        "config/experiment.yaml",
        "plots/training_curves.png",
        "evaluation/confusion_matrix.png",
        "evaluation/per_class.csv",
        "evaluation/confusion_matrix.json",
        "weights/model.safetensors",
        "weights/model_config.json",
    } <= listed
    import mlflow

    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evaluation", tracking_uri=store["env"]["MLFLOW_TRACKING_URI"]
    )
    cm = np.array(json.load(open(f"{local}/confusion_matrix.json"))["matrix"])
    assert cm.sum() == 200 and cm.shape == (10, 10)
    assert np.trace(cm) / 200 == pytest.approx(store["run"].data.metrics["test/accuracy"], abs=1e-6)


@pytest.fixture(scope="module")
def test_images(mini_dir):
    from cifar.data.sources import read_imagefolder

    raw = read_imagefolder(mini_dir, workers=1)
    return raw.test_images, raw.test_labels  # uint8 N x 32 x 32 x 3: the served model's input


def test_logged_model_loads_with_pyfunc_and_predicts(store, test_images):
    import mlflow

    mlflow.set_tracking_uri(store["env"]["MLFLOW_TRACKING_URI"])
    run = store["run"]
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert logged.source_run_id == run.info.run_id
    assert run.data.tags["model_uri"] == f"models:/{logged.model_id}"
    model = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    images, labels = test_images
    out = model.predict({"image": images})
    assert set(out) == {"label", "probabilities", "in_distribution", "ood_score", "logits"}
    accuracy = float((out["logits"].argmax(1) == labels).mean())
    assert accuracy == pytest.approx(run.data.metrics["test/accuracy"], abs=1e-6)  # served == evaluated
    assert np.mean(out["in_distribution"]) == pytest.approx(run.data.metrics["ood/accept_rate_in"], abs=1e-6)
    assert accuracy > 0.2  # chance is 0.1
    by_run = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict({"image": images[:50]})
    assert list(by_run["label"]) == list(out["label"][:50])  # the run's own path loads the same model


def test_onnx_matches_pytorch_from_safetensors(store, test_images):
    """Rebuild the model from safetensors + JSON (no pickle) and compare with ONNX Runtime."""
    import mlflow
    import onnxruntime as ort

    from cifar.run.export import load_weights, torch_network

    uri = store["env"]["MLFLOW_TRACKING_URI"]
    run_id = store["run"].info.run_id
    weights = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="weights", tracking_uri=uri)
    model, config = load_weights(weights)
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(store["run"].data.tags["model_uri"])
    session = ort.InferenceSession(f"{local}/model.onnx", providers=["CPUExecutionProvider"])
    images, _ = test_images
    expected, _ = torch_network(model, torch.device("cpu"), tta=bool(config.get("tta")))(images)
    (actual,) = session.run(["logits"], {"image": images})
    assert np.abs(actual - expected).max() < 1e-4
    meta = json.loads(session.get_modelmeta().custom_metadata_map["cifar"])
    assert meta["classes"][3] == "cat" and meta["run_id"] == run_id


def test_config_artifact_reproduces_the_run(store):
    """``train.py --config <the run's experiment.yaml>`` trains the same recipe to the same numbers."""
    import mlflow

    uri = store["env"]["MLFLOW_TRACKING_URI"]
    path = mlflow.artifacts.download_artifacts(
        run_id=store["run"].info.run_id, artifact_path="config/experiment.yaml", tracking_uri=uri
    )
    result = run_cli(
        [str(ROOT / "train.py"), "--config", path, "--no-progress", "--mlflow-experiment", "again", "--device", "cpu"],
        env=store["env"],
        cwd=store["root"],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    client = store["client"]
    (again,) = client.search_runs([client.get_experiment_by_name("again").experiment_id])
    first = store["run"]
    recipe = {k: v for k, v in first.data.params.items() if not k.startswith("data.")}
    assert {k: again.data.params[k] for k in recipe} == recipe
    assert again.data.metrics["val/accuracy"] == first.data.metrics["val/accuracy"]


def test_failure_inside_training_marks_the_run_failed(tmp_path, prepared_dir):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CIFAR_DATA": str(prepared_dir)}
    result = run_cli(
        [str(ROOT / "train.py"), "--experiment", "smoke", "--epochs", "1", "--set", "optim.lr=1e12", "--no-progress"],
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: training diverged")
    assert "Traceback" not in result.stderr
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["error"]
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="error/traceback.txt", tracking_uri=env["MLFLOW_TRACKING_URI"]
    )
    assert "Traceback" in open(local).read()


def test_unreachable_tracking_server(tmp_path, prepared_dir):
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        [str(ROOT / "train.py"), "--experiment", "smoke"],
        env={"MLFLOW_TRACKING_URI": uri, "CIFAR_DATA": str(prepared_dir)},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert uri in message and "unset MLFLOW_TRACKING_URI" in message and "Traceback" not in result.stderr


def test_tensorboard_event_files(store):
    """Read the run's event files back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = store["run"]
    logdirs = {p.parent for p in (store["root"] / "runs").rglob("events.out.tfevents.*")}
    (logdir,) = [d for d in logdirs if d.name.endswith(run.info.run_id[:8])]
    accumulator = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "learning_rate"} <= set(tags["scalars"])
    assert [e.step for e in accumulator.Scalars("accuracy/val")] == [1, 2, 3, 4]
    val = [m.value for m in store["client"].get_metric_history(run.info.run_id, "val/accuracy")]
    assert [e.value for e in accumulator.Scalars("accuracy/val")] == pytest.approx(val)
    assert {"augmented_batch", "confusion_matrix"} <= set(tags["images"])
    assert accumulator.PluginTagToContent("hparams")  # the recipe with its final metrics
    uploaded = store["client"].list_artifacts(run.info.run_id, "tensorboard")
    assert any(a.path.startswith("tensorboard/events.out.tfevents") for a in uploaded)

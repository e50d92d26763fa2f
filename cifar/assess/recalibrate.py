"""Refit the served graph's constants of a logged model, a registered version or a model folder.

    python -m cifar calibrate --run-id RUN_ID
    python -m cifar calibrate --model-uri models:/cifar10-classifier@production
    python -m cifar calibrate --model-uri models/bundled

rewrites the graph's constants (in the logged model in MLflow, which every registered version
of it shares) and logs the metrics and figures to the run. The fitting itself is
``cifar.run.calibration``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from cifar.cli import run_cli
from cifar.contract import schema
from cifar.contract.registered_model import logged_model_id
from cifar.data import ensure_cache
from cifar.errors import CifarError
from cifar.run.calibration import describe, refit, write_trust_report
from cifar.serve.inference import find_onnx
from cifar.tracking import check_tracking_store, replace_logged_model, save_onnx_model_folder
from cifar.tracking.names import mlflow_metrics
from cifar.tracking.store import _mlflow


def _model_id(model_uri: str) -> str:
    """The MLflow logged-model id behind runs' ``model_uri`` tags and registered versions."""
    model_id = logged_model_id(model_uri)
    if model_id:
        return model_id
    raise CifarError(f"{model_uri} is not a logged MLflow model (models:/m-..., models:/name/N or @alias).")


def calibrate_model(
    model_uri: str | None = None, run_id: str | None = None, data_dir: Path | None = None, dataset: str = ""
):
    """Refit and store the constants of a logged model, a registered version or a local model folder."""
    mlflow = _mlflow()
    local = Path(model_uri).expanduser() if model_uri and Path(model_uri).expanduser().is_dir() else None
    client = None
    if local is None:
        check_tracking_store()
        client = mlflow.MlflowClient()
        if run_id:
            try:
                model_uri = client.get_run(run_id).data.tags.get("model_uri")
            except mlflow.exceptions.MlflowException:
                raise CifarError(f"no run {run_id} in {mlflow.get_tracking_uri()}.") from None
            if not model_uri:
                raise CifarError(f"run {run_id} has no logged model (tag model_uri); it cannot be calibrated.")
        model_id = _model_id(model_uri)
        run_id = run_id or client.get_logged_model(model_id).source_run_id
    data = ensure_cache(data_dir, dataset=dataset)
    with tempfile.TemporaryDirectory() as tmp:
        folder = local or Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=f"{tmp}/model"))
        proto = onnx.load(str(find_onnx(folder)))
        if not schema.is_served(proto):
            raise CifarError(
                f"{model_uri} is not a served model of this project (uint8 images in; label, probabilities and "
                "OOD score out), so it has no constants to refit; train it again with python train.py."
            )
        metadata = schema.metadata_of(proto)
        if tuple(metadata.get("classes", ())) != tuple(data.classes):
            raise CifarError(
                f"{model_uri} predicts {metadata.get('classes')}, but the prepared data has {data.classes}."
            )
        proto, calibration = refit(proto, data)
        metadata = schema.metadata_of(proto)
        report = write_trust_report(calibration, data.labels["test"], Path(tmp) / "trust")
        example = np.asarray(data.images["val"][:2])
        if local is not None:
            staged = save_onnx_model_folder(proto, metadata, example, Path(tmp) / "staged")
            for path in staged.iterdir():  # the model's own files; the card and figures beside them stay
                path.replace(local / path.name)
            print(f"rewrote {local}")
        else:
            replace_logged_model(model_id, proto, metadata, example)
            if run_id:
                client.log_artifacts(run_id, str(report), "trust")
                for key, value in mlflow_metrics(calibration.profile.metrics).items():
                    client.log_metric(run_id, key, value, model_id=model_id)
            print(f"rewrote model {model_id}'s constants" + (f"; report in run {run_id}" if run_id else ""))
    print(describe(calibration.profile))
    return calibration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="a training run with a logged model")
    which.add_argument("--model-uri", help="models:/name@alias, models:/name/N, models:/m-ID or a model folder")
    parser.add_argument("--data-dir", type=Path, help="prepared data (default: data/)")
    parser.add_argument("--dataset", default="", help="a prepared dataset other than CIFAR-10 (its data and model)")
    args = parser.parse_args(argv)
    calibrate_model(args.model_uri, args.run_id, args.data_dir, args.dataset)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

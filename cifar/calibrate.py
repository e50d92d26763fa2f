"""Fit the served graph's constants: temperature, the "none of these" score and its threshold; measure them.

Every training run does this at its end, on the PyTorch model, before the graph is exported.
A logged model, a registered version or a model folder is refitted in place::

    python -m cifar.calibrate --run-id RUN_ID
    python -m cifar.calibrate --model-uri models:/cifar10-classifier@production
    python -m cifar.calibrate --model-uri models/bundled

which rewrites the graph's constants (in the logged model in MLflow, which every registered
version of it shares) and logs the metrics and figures to the run. A model logged in the old
format (float N x 3 x 32 x 32 in, logits out) is re-exported from its run's ``weights/`` first.

Fitting uses training and validation images only: the score's class means and covariance come
from training images, the temperature and the threshold from the validation split. The test
split and the out-of-distribution sets (noise, flat colours, Fashion-MNIST) only measure.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cifar import contract
from cifar.cli import run_cli
from cifar.errors import CifarError
from cifar.trust import (
    ACCEPT_RATE,
    FASHION_MNIST_MISSING,
    OodSet,
    TrustProfile,
    acceptance_threshold,
    assess,
    fashion_mnist_images,
    fit_density,
    fit_temperature,
    generated_ood_images,
)

# Training images the score is fitted on: all 45,000 gain little for a feature pass 4.5 times as long
# in every run and trial (benchmarks/ood_scores.py, RESULTS.md 2026-12-02).
FIT_IMAGES = 10_000


@functools.lru_cache(maxsize=1)
def ood_sets() -> tuple[tuple[OodSet, ...], dict[str, str]]:
    """(sets to measure on, {set: why it was not measured}): noise and flat images, and Fashion-MNIST.

    Built once per process: a tune worker calibrates every trial on the same images.
    """
    fashion = fashion_mnist_images()
    if fashion is None:
        return tuple(generated_ood_images()), {"fashion_mnist": FASHION_MNIST_MISSING}
    return (*generated_ood_images(), fashion), {}


@dataclass(frozen=True)
class Calibration:
    constants: contract.Constants
    profile: TrustProfile  # the record, with what the constants were measured to do
    outputs: dict[str, dict[str, np.ndarray]]  # the head's outputs on "test" and each OOD set

    @property
    def scores(self) -> dict[str, np.ndarray]:
        return {name: out[contract.OOD_SCORE] for name, out in self.outputs.items()}


def fit_sample(data, count: int = FIT_IMAGES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(data.images["train"]), np.asarray(data.labels["train"])
    if len(labels) > count:
        pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:count])
        images, labels = images[pick], labels[pick]
    return images, labels


def calibrate_network(net: contract.NetOutputs, data, test: tuple[np.ndarray, np.ndarray] | None = None) -> Calibration:
    """Fit the constants for a network (``net``: uint8 images -> logits, features); measure them through the head.

    ``test`` is the network's (logits, features) on the test split, when the caller has them.
    """
    classes = list(data.classes)
    train_images, train_labels = fit_sample(data)
    _, train_features = net(train_images)
    val_logits, val_features = net(np.asarray(data.images["val"]))
    test_logits, test_features = test if test is not None else net(np.asarray(data.images["test"]))
    whitening, means = fit_density(train_features, train_labels, len(classes))
    provisional = contract.Constants(fit_temperature(val_logits, data.labels["val"]), np.inf, whitening, means)
    val_scores = contract.apply_head(classes, provisional, val_logits, val_features)[contract.OOD_SCORE]
    constants = replace(provisional, threshold=acceptance_threshold(val_scores, ACCEPT_RATE))
    sets, not_measured = ood_sets()
    outputs = {"test": contract.apply_head(classes, constants, test_logits, test_features)}
    outputs.update({s.name: contract.apply_head(classes, constants, *net(s.images)) for s in sets})
    ood = {name: out for name, out in outputs.items() if name != "test"}
    metrics = assess(constants.temperature, constants.threshold, outputs["test"], data.labels["test"], ood)
    profile = TrustProfile(
        constants.temperature,
        constants.threshold,
        ACCEPT_RATE,
        metrics=metrics,
        not_measured=not_measured,
        fit_images=len(train_labels),
    )
    return Calibration(constants, profile, outputs)


@dataclass(frozen=True)
class ServedModel:
    proto: Any  # onnx.ModelProto: the served graph
    metadata: dict[str, Any]  # its metadata (classes, recipe facts, the trust record)
    calibration: Calibration
    parity: float  # largest |logit difference| between the graph and PyTorch on 64 validation images


def serve_model(
    model,
    data,
    metadata: dict[str, Any],
    device,
    *,
    batch_size: int = 1000,
    channels_last: bool = False,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> ServedModel:
    """A trained PyTorch model -> its served graph, constants fitted on this data (training, bundle build)."""
    from cifar.export import export_served, feature_layout, served_parity, torch_network

    tta = bool(metadata.get("tta"))
    net = torch_network(model, device, tta=tta, batch_size=batch_size, channels_last=channels_last)
    calibration = calibrate_network(net, data, test)
    layout = feature_layout(model, len(calibration.constants.whitening))
    metadata = {**metadata, "features": layout, "trust": calibration.profile.to_dict()}
    proto = export_served(model, metadata, calibration.constants)
    parity = served_parity(model, proto, np.asarray(data.images["val"][:64]), tta)
    return ServedModel(proto, metadata, calibration, parity)


def refit(proto, data) -> tuple[Any, Calibration]:
    """A served graph with its constants refitted on ``data`` through its own network (float or int8)."""
    calibration = calibrate_network(contract.network_of(proto), data)
    metadata = {**contract.metadata_of(proto), "trust": calibration.profile.to_dict()}
    contract.set_constants(proto, calibration.constants, metadata)
    return proto, calibration


def write_trust_report(calibration: Calibration, test_labels: np.ndarray, folder: Path) -> Path:
    """Reliability diagrams before/after the temperature, the OOD score histogram, metrics.csv, trust.json."""
    import pandas as pd

    from cifar.metrics import calibration_bins, softmax
    from cifar.plots import ood_score_histogram, reliability_diagram

    folder.mkdir(parents=True, exist_ok=True)
    profile, m = calibration.profile, calibration.profile.metrics
    test = calibration.outputs["test"]
    for name, probabilities, ece in (
        ("uncalibrated", softmax(np.asarray(test[contract.LOGITS], np.float64)), m["test_ece_uncalibrated"]),
        ("calibrated", test[contract.PROBABILITIES], m["test_ece_calibrated"]),
    ):
        bins = calibration_bins(np.asarray(probabilities, np.float64), test_labels)
        title = f"T = {profile.temperature:.2f}" if name == "calibrated" else "before temperature scaling"
        reliability_diagram(bins, ece, title).savefig(folder / f"reliability_{name}.png")
    ood_score_histogram(calibration.scores, profile.ood_threshold, profile.accept_rate).savefig(
        folder / "ood_scores.png"
    )
    pd.DataFrame([m]).T.rename(columns={0: "value"}).to_csv(folder / "metrics.csv", float_format="%.6f")
    (folder / "trust.json").write_text(json.dumps(profile.to_dict(), indent=2))
    return folder


def describe(profile: TrustProfile) -> str:
    """Temperature and calibration, each OOD set, then what was not measured: what a run prints."""
    p, m = profile, profile.metrics
    lines = [
        f"temperature {p.temperature:.3f}: test ECE {m['test_ece_uncalibrated']:.4f} -> "
        f"{m['test_ece_calibrated']:.4f}, NLL {m['test_nll_uncalibrated']:.4f} -> {m['test_nll_calibrated']:.4f}",
        f"'none of these' threshold accepts {m['ood_accept_rate_in']:.1%} of test images "
        f"({p.accept_rate:.0%} of validation); "
        + ", ".join(
            f"{k.removeprefix('ood_auroc_')} AUROC {v:.3f} (accepted {m['ood_false_accept_' + k[10:]]:.1%})"
            for k, v in m.items()
            if k.startswith("ood_auroc_")
        ),
    ]
    lines += [f"OOD set {name} {why}" for name, why in p.not_measured.items()]
    return "\n".join(lines)


def _model_id(model_uri: str) -> str:
    """The MLflow logged-model id behind runs' ``model_uri`` tags and registered versions."""
    if model_uri.startswith("models:/m-"):
        return model_uri.removeprefix("models:/").split("/")[0]
    if model_uri.startswith("models:/"):
        from cifar.evaluate import _model_version

        version = _model_version(model_uri)
        if version is not None and version.source.startswith("models:/m-"):
            return version.source.removeprefix("models:/").split("/")[0]
        if version is not None and getattr(version, "model_id", None):
            return version.model_id
    raise CifarError(f"{model_uri} is not a logged MLflow model (models:/m-..., models:/name/N or @alias).")


def _reexport(old_metadata: dict[str, Any], weights: Path, data, source: str) -> ServedModel:
    """An old-format model rebuilt in the served format from its safetensors weights."""
    import torch

    from cifar.export import load_weights

    if not (weights / "model.safetensors").is_file():
        raise CifarError(
            f"{source} is in the old format (float N x 3 x 32 x 32 in, logits out) and there are no weights "
            f"(model.safetensors + model_config.json) to re-export it from; retrain it, or rebuild a folder "
            "with python -m cifar.bundle build --weights DIR."
        )
    model, _ = load_weights(weights)
    keep = {k: v for k, v in old_metadata.items() if k not in ("input", "trust")}
    metadata = {**keep, "contract": contract.describe(old_metadata["classes"])}
    served = serve_model(model, data, metadata, torch.device("cpu"), batch_size=500)
    print(f"re-exported {source} from its weights in the served format (logit parity {served.parity:.1e})")
    return served


def calibrate_model(model_uri: str | None = None, run_id: str | None = None, data_dir: Path | None = None):
    """Refit and store the constants of a logged model, a registered version or a local model folder."""
    import mlflow
    import onnx

    from cifar.data import ensure_cache

    local = Path(model_uri).expanduser() if model_uri and Path(model_uri).expanduser().is_dir() else None
    client = None
    if local is None:
        from cifar.tracking import check_tracking_store

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
    data = ensure_cache(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        folder = local or Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=f"{tmp}/model"))
        onnx_path = _onnx_file(folder)
        proto = onnx.load(str(onnx_path))
        metadata = contract.metadata_of(proto)
        if tuple(metadata.get("classes", ())) != tuple(data.classes):
            raise CifarError(
                f"{model_uri} predicts {metadata.get('classes')}, but the prepared data has {data.classes}."
            )
        if contract.is_served(proto):
            proto, calibration = refit(proto, data)
            metadata = contract.metadata_of(proto)
        else:
            weights = local if local is not None else _download_weights(run_id, Path(tmp) / "weights")
            served = _reexport(metadata, weights, data, model_uri)
            proto, metadata, calibration = served.proto, served.metadata, served.calibration
        report = write_trust_report(calibration, data.labels["test"], Path(tmp) / "trust")
        example = np.asarray(data.images["val"][:2])
        if local is not None:
            from cifar.tracking import save_onnx_model_folder

            staged = save_onnx_model_folder(proto, metadata, example, Path(tmp) / "staged")
            for path in staged.iterdir():  # the model's own files; the card and figures beside them stay
                path.replace(local / path.name)
            print(f"rewrote {local}")
        else:
            from cifar.tracking import replace_logged_model

            replace_logged_model(model_id, proto, metadata, example)
            if run_id:
                client.log_artifacts(run_id, str(report), "trust")
                from cifar.tracking.names import mlflow_metrics

                for key, value in mlflow_metrics(calibration.profile.metrics).items():
                    client.log_metric(run_id, key, value, model_id=model_id)
            print(f"rewrote model {model_id}'s constants" + (f"; report in run {run_id}" if run_id else ""))
    print(describe(calibration.profile))
    return calibration


def _onnx_file(folder: Path) -> Path:
    from cifar.inference import find_onnx

    return find_onnx(folder)


def _download_weights(run_id: str | None, folder: Path) -> Path:
    """The run's ``weights/`` artifacts (safetensors + config), for re-exporting an old-format model."""
    import mlflow

    if run_id:
        try:
            return Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="weights", dst_path=str(folder))
            )
        except (mlflow.exceptions.MlflowException, OSError):
            pass
    return folder  # empty: _reexport says what to do


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar.calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="a training run with a logged model")
    which.add_argument("--model-uri", help="models:/name@alias, models:/name/N, models:/m-ID or a model folder")
    parser.add_argument("--data-dir", type=Path, help="prepared data (default: data/)")
    args = parser.parse_args(argv)
    calibrate_model(args.model_uri, args.run_id, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

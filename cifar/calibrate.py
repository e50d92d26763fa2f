"""Calibrated confidence and "none of these" detection for a model: fit on validation, report on test.

Every training run does this at its end (the profile goes into the logged model's metadata).
For older runs, registered versions or a model folder::

    python -m cifar.calibrate --run-id RUN_ID
    python -m cifar.calibrate --model-uri models:/cifar10-classifier@production
    python -m cifar.calibrate --model-uri models/bundled

writes ``trust.json`` (temperature, OOD threshold, measured metrics) beside the model's ONNX file
(into the logged model in MLflow, which every registered version of it shares) and logs the
metrics and figures to the run. Predictors apply it from then on.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cifar.cli import run_cli
from cifar.errors import CifarError
from cifar.trust import (
    OodSet,
    TrustProfile,
    assess,
    fashion_mnist_images,
    fit_profile,
    generated_ood_images,
)

TRUST_FILE = "trust.json"


@functools.lru_cache(maxsize=1)
def ood_sets() -> tuple[OodSet, ...]:
    """Generated noise and flat images, plus Fashion-MNIST when Debian's package is installed.

    Built once per process: a tune worker calibrates every trial on the same images.
    """
    fashion = fashion_mnist_images()
    return (*generated_ood_images(), *([fashion] if fashion is not None else []))


def calibrate_logits(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    ood_logits: dict[str, np.ndarray],
) -> tuple[TrustProfile, dict[str, np.ndarray]]:
    """Fit the profile on validation; measure it on test and the OOD sets. (profile with metrics, scores)."""
    profile = fit_profile(val_logits, val_labels)
    metrics, scores = assess(profile, test_logits, test_labels, ood_logits)
    return TrustProfile(profile.temperature, profile.ood_threshold, profile.accept_rate, metrics=metrics), scores


def calibrate_with(
    logits_of: Callable[[np.ndarray], np.ndarray], data
) -> tuple[TrustProfile, dict[str, np.ndarray], np.ndarray]:
    """Run ``logits_of`` (images -> logits) over val, test and the OOD sets. (profile, scores, test logits)."""
    test_logits = logits_of(np.asarray(data.images["test"]))
    profile, scores = calibrate_logits(
        logits_of(np.asarray(data.images["val"])),
        data.labels["val"],
        test_logits,
        data.labels["test"],
        {s.name: logits_of(s.images) for s in ood_sets()},
    )
    return profile, scores, test_logits


def write_trust_report(
    profile: TrustProfile, scores: dict[str, np.ndarray], test_logits: np.ndarray, test_labels: np.ndarray, folder: Path
) -> Path:
    """Reliability diagrams before/after temperature scaling, the OOD score histogram, metrics.csv."""
    import pandas as pd

    from cifar.metrics import calibration_bins, softmax
    from cifar.plots import ood_score_histogram, reliability_diagram

    folder.mkdir(parents=True, exist_ok=True)
    m = profile.metrics
    logits = np.asarray(test_logits, np.float64)
    for name, temperature, ece in (
        ("uncalibrated", 1.0, m["test_ece_uncalibrated"]),
        ("calibrated", profile.temperature, m["test_ece_calibrated"]),
    ):
        bins = calibration_bins(softmax(logits / temperature), test_labels)
        title = f"T = {temperature:.2f}" if name == "calibrated" else "before temperature scaling"
        reliability_diagram(bins, ece, title).savefig(folder / f"reliability_{name}.png")
    if profile.ood_threshold is not None and scores:
        ood_score_histogram(scores, profile.ood_threshold, profile.accept_rate).savefig(folder / "ood_scores.png")
    pd.DataFrame([m]).T.rename(columns={0: "value"}).to_csv(folder / "metrics.csv", float_format="%.6f")
    (folder / TRUST_FILE).write_text(json.dumps(profile.to_dict(), indent=2))
    return folder


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


def calibrate_model(
    model_uri: str | None = None, run_id: str | None = None, data_dir: Path | None = None
) -> TrustProfile:
    """Fit and store the trust profile of a logged model, a registered version or a local model folder."""
    import mlflow

    from cifar.data import ensure_cache
    from cifar.inference import Predictor
    from cifar.tracking import check_tracking_store

    local = model_uri is not None and Path(model_uri).expanduser().is_dir()
    if not local:
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
    predictor = Predictor.from_uri(model_uri)
    data = ensure_cache(data_dir)
    if tuple(predictor.classes) != tuple(data.classes):
        raise CifarError(f"{model_uri} predicts {predictor.classes}, but the prepared data has {data.classes}.")
    profile, scores, test_logits = calibrate_with(predictor.logits, data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_trust_report(profile, scores, test_logits, data.labels["test"], Path(tmp) / "trust")
        if local:
            target = Path(model_uri).expanduser() / TRUST_FILE
            target.write_text((folder / TRUST_FILE).read_text())
            print(f"wrote {target}")
        else:
            client.log_model_artifact(model_id, str(folder / TRUST_FILE))
            if run_id:
                client.log_artifacts(run_id, str(folder), "trust")
                for key, value in profile.metrics.items():
                    client.log_metric(run_id, key, value)
            print(f"stored {TRUST_FILE} in model {model_id}" + (f"; report in run {run_id}" if run_id else ""))
    m = profile.metrics
    print(
        f"temperature {profile.temperature:.3f}; test ECE {m['test_ece_uncalibrated']:.4f} -> "
        f"{m['test_ece_calibrated']:.4f}, NLL {m['test_nll_uncalibrated']:.4f} -> {m['test_nll_calibrated']:.4f}; "
        + ", ".join(f"{k.removeprefix('ood_auroc_')} AUROC {v:.3f}" for k, v in m.items() if k.startswith("ood_auroc"))
    )
    return profile


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

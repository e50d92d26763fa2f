"""int8 models for serving: ONNX Runtime static quantization, calibrated on the validation split.

    python -m cifar quantize --run-id RUN_ID                      # logs model_int8 to the run
    python -m cifar quantize --model-uri models/bundled --out DIR  # writes an MLflow model folder
    python register.py --int8                                      # quantizes the chosen run, registers that

Weights become int8 per output channel (7-bit range, see ``quantize_onnx``), activations uint8
with ranges taken from validation images (the 99.999th percentile of each tensor: a few extreme
activations do not widen the range for all the others). The contract's head (temperature, the
out-of-distribution score and its threshold) stays in float, and its constants are refitted on
the int8 network's own logits and features (``cifar.run.calibration.refit``); its accuracy is measured on validation
(against the float model's, for ``register.py --max-int8-drop``) and on test, for the record. It
runs about 2x faster than the float model even on 2 AVX2 cores without VNNI
(``benchmarks/inference.py``, RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from cifar.cli import run_cli
from cifar.contract import schema
from cifar.contract.registered_model import VersionTags
from cifar.contract.trust import TrustProfile
from cifar.data import ensure_cache
from cifar.errors import CifarError, writable_dir
from cifar.run import export
from cifar.run.calibration import describe as describe_trust
from cifar.run.calibration import refit
from cifar.serve.inference import Predictor
from cifar.tracking import check_tracking_store, log_derived_model, save_onnx_model_folder
from cifar.tracking.store import _mlflow

INT8_ARTIFACT = "model_int8"
INT8_URI_TAG = "model_int8_uri"
CALIBRATION_IMAGES = 512
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class QuantizedModel:
    path: Path  # the int8 .onnx file (its metadata carries the refitted trust profile)
    metadata: dict[str, Any]
    float_val_accuracy: float
    val_accuracy: float
    test_accuracy: float
    val_agreement: float  # share of validation images both models give the same label
    trust: TrustProfile
    seconds: float
    test_logits: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 10)))

    @property
    def val_accuracy_drop(self) -> float:
        return self.float_val_accuracy - self.val_accuracy

    def metrics(self) -> dict[str, float]:
        return {
            "int8_val_accuracy": self.val_accuracy,
            "int8_test_accuracy": self.test_accuracy,
            "int8_val_agreement": self.val_agreement,
            "int8_val_accuracy_drop": self.val_accuracy_drop,
        }

    def trust_metrics(self) -> dict[str, float]:
        """The int8 model's own calibration and OOD figures, named as a run logs them."""
        return {**self.trust.metrics, "temperature": self.trust.temperature}


def whole_batches(images: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> np.ndarray:
    """Drop a short last batch: the percentile calibrator stacks per-batch arrays, so sizes must agree."""
    return images[: len(images) - len(images) % batch_size] if len(images) > batch_size else images


def quantize_onnx(source: Path, calibration: np.ndarray, target: Path, batch_size: int = CALIBRATION_BATCH) -> Path:
    """Quantize ``source`` into ``target``: QDQ, int8 weights per channel (7-bit range), uint8 activations.

    The contract's head (``cifar.contract.schema``) is left in float: its distances and softmax need the range.
    """
    calibration = whole_batches(calibration, batch_size)
    batches = [
        {schema.INPUT: np.ascontiguousarray(calibration[i : i + batch_size], np.uint8)}
        for i in range(0, len(calibration), batch_size)
    ]
    head = export.head_nodes(onnx.load(str(source)))

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(batches)

        def get_next(self):
            return next(self.remaining, None)

    target.parent.mkdir(parents=True, exist_ok=True)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # per-tensor notes about rank-1 batch-norm weights, not problems
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints its progress
            quantize_static(
                str(source),
                str(target),
                Batches(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # 7-bit weights: on x86 without VNNI (AVX2, e.g. AMD EPYC) onnxruntime multiplies u8 x s8
                # pairs with VPMADDUBSW, whose int16 sums saturate at 8 bits and wreck accuracy (92% -> 57%)
                reduce_range=True,
                calibrate_method=CalibrationMethod.Percentile,
                nodes_to_exclude=head,
            )
    finally:
        logging.disable(previous)
    return target


def quantize_model(onnx_path: Path, data, folder: Path, calibration_images: int = CALIBRATION_IMAGES) -> QuantizedModel:
    """Quantize a float served model on ``data``'s validation images; refit its constants; measure it."""
    start = time.perf_counter()
    original = Predictor(onnx_path)
    digest = original.metadata.get("data_digest")
    if digest and digest != data.digest:  # e.g. the same archive decoded by another JPEG library
        print(
            f"warning: {original.description} was trained on data {digest[:12]}, the prepared cache is "
            f"{data.digest[:12]}; its validation figures hold only if both split the images alike.",
            file=sys.stderr,
        )
    if tuple(original.classes) != tuple(data.classes):
        raise CifarError(f"{original.description} predicts {original.classes}, but the data has {data.classes}.")
    if original.metadata.get("precision") == "int8":
        raise CifarError(f"{original.description} is already int8.")
    val_images, val_labels = np.asarray(data.images["val"]), np.asarray(data.labels["val"])
    calibration = whole_batches(val_images[:calibration_images])
    target = quantize_onnx(Path(onnx_path), calibration, folder / "model.onnx")
    proto, refitted = refit(onnx.load(str(target)), data)
    onnx.save(proto, str(target))
    float_val, int8_val = original.predicted_classes(val_images), Predictor(target).predicted_classes(val_images)
    test_logits = refitted.outputs["test"][schema.LOGITS].astype(np.float64)
    metadata = {
        **schema.metadata_of(proto),
        "precision": "int8",
        "quantization": {
            "method": "onnxruntime static, QDQ, int8 weights per channel (7-bit range), uint8 activations, "
            "percentile ranges; the contract's head in float",
            "calibration_images": len(calibration),
            "calibration_split": "validation",
            "float_val_accuracy": float((float_val == val_labels).mean()),
        },
        "val_accuracy": float((int8_val == val_labels).mean()),
        "test_accuracy": float((test_logits.argmax(1) == data.labels["test"]).mean()),
    }
    schema.set_metadata(proto, metadata)
    onnx.save(proto, str(target))
    trust = refitted.profile
    return QuantizedModel(
        path=target,
        metadata=metadata,
        float_val_accuracy=metadata["quantization"]["float_val_accuracy"],
        val_accuracy=metadata["val_accuracy"],
        test_accuracy=metadata["test_accuracy"],
        val_agreement=float((float_val == int8_val).mean()),
        trust=trust,
        seconds=time.perf_counter() - start,
        test_logits=test_logits,
    )


def quantize_run(
    run_id: str, data_dir: Path | None = None, calibration_images: int = CALIBRATION_IMAGES
) -> tuple[str, QuantizedModel]:
    """Quantize a run's logged model; log the int8 model (``model_int8``) and its figures to that run."""
    mlflow = _mlflow()
    check_tracking_store()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise CifarError(f"no run {run_id} in {mlflow.get_tracking_uri()}.") from None
    model_uri = run.data.tags.get("model_uri")
    if not model_uri:
        raise CifarError(f"run {run_id} has no logged model (tag model_uri); there is nothing to quantize.")
    source, data = Predictor.from_uri(model_uri), ensure_cache(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        result = quantize_model(source.onnx_path, data, Path(tmp), calibration_images)
        example = np.asarray(data.images["val"][:2])
        uri = log_derived_model(
            run_id,
            result.path,
            result.metadata,
            example,
            artifact=INT8_ARTIFACT,
            uri_tag=INT8_URI_TAG,
            metrics=result.metrics(),
        )
    return uri, result


def int8_candidate(candidate, data_dir: Path | None = None, calibration_images: int = CALIBRATION_IMAGES):
    """The registry candidate (``cifar.promote.registry.Candidate``) with its run's model replaced by the int8 one.

    Returns (candidate, QuantizedModel); the int8 model's own trust figures replace the run's, and its
    validation figure is the run's less what int8 loses, so it competes with production as served.
    """
    uri, result = quantize_run(candidate.run_id, data_dir, calibration_images)
    value = candidate.value - result.val_accuracy_drop
    return replace(candidate, model_uri=uri, value=value, trust=result.trust_metrics()), result


def int8_shortfall(result: QuantizedModel, max_drop: float) -> str | None:
    """Why the int8 model may not replace the float one (``--max-int8-drop``), or None."""
    if result.val_accuracy_drop > max_drop:
        return (
            f"int8 loses {result.val_accuracy_drop:.2%} validation accuracy ({result.float_val_accuracy:.4f} -> "
            f"{result.val_accuracy:.4f}), more than --max-int8-drop {max_drop:g}"
        )
    return None


def int8_tags(result: QuantizedModel):
    """What an int8 version's tags add (``VersionTags``): its precision and int8 figures."""
    return VersionTags(precision="int8", extra={k: f"{v:.6f}" for k, v in result.metrics().items()})


def save_model_folder(result: QuantizedModel, out: Path, example: np.ndarray) -> Path:
    """An MLflow model folder (MLmodel, model.onnx, environment files) for the int8 model."""
    return save_onnx_model_folder(onnx.load(str(result.path)), result.metadata, example, out)


def describe(result: QuantizedModel) -> str:
    return (
        f"int8 model: validation accuracy {result.val_accuracy:.4f} (float {result.float_val_accuracy:.4f}, "
        f"same label on {result.val_agreement:.2%} of images), test accuracy {result.test_accuracy:.4f}; "
        f"{result.seconds:.0f} s\n" + describe_trust(result.trust)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar quantize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="a training run with a logged model: the int8 model is logged to it")
    which.add_argument("--model-uri", help="models:/..., runs:/..., a model folder or .onnx file (needs --out)")
    parser.add_argument("--out", type=Path, help="with --model-uri: write the int8 MLflow model folder here")
    parser.add_argument("--data-dir", type=Path, help="prepared data (default: data/)")
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    args = parser.parse_args(argv)
    if args.calibration_images < 1:
        parser.error("--calibration-images must be at least 1")
    if args.run_id:
        uri, result = quantize_run(args.run_id, args.data_dir, args.calibration_images)
        print(describe(result))
        print(f"logged {uri} to run {args.run_id} (tag {INT8_URI_TAG})")
        return 0
    if args.out is None:
        parser.error("--model-uri needs --out DIR (or use --run-id to log the int8 model to its run)")
    if args.out.exists() and any(args.out.iterdir()):
        raise CifarError(f"--out {args.out} is not empty; name a new folder.")
    writable_dir(args.out, "output folder", "--out")
    source = Predictor.from_uri(args.model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        data = ensure_cache(args.data_dir)
        result = quantize_model(source.onnx_path, data, Path(tmp), args.calibration_images)
        save_model_folder(result, args.out, np.asarray(data.images["val"][:2]))
    print(describe(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""The model shipped with the repository (``models/bundled/``), so a fresh clone serves predictions.

``python -m cifar.bundle build --weights DIR`` turns a training's safetensors weights (from
``train.py --save-dir``) into an MLflow ONNX model folder with a model card, measuring its
accuracy here on the test split. ``register.py --import-bundled`` puts it in the registry.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from cifar.cli import run_cli
from cifar.config import PROJECT_ROOT
from cifar.errors import CifarError
from cifar.registry import MODEL_NAME

BUNDLE_DIR = PROJECT_ROOT / "models" / "bundled"


def build_bundle(
    weights_dir: Path, out_dir: Path = BUNDLE_DIR, data_dir: Path | None = None, command: str = ""
) -> dict:
    import torch

    from cifar.data import ensure_cache
    from cifar.engine import evaluate
    from cifar.export import export_onnx, load_weights, onnx_parity
    from cifar.metrics import confusion_matrix, per_class_report
    from cifar.tracking import onnx_signature

    model, meta = load_weights(weights_dir)
    data = ensure_cache(data_dir)
    if meta.get("data_digest") and meta["data_digest"] != data.digest:
        print(f"note: weights were trained on data {meta['data_digest'][:12]}, evaluating on {data.digest[:12]}")
    test = evaluate(
        model,
        data.images["test"],
        data.labels["test"],
        device=torch.device("cpu"),
        tta=bool(meta.get("tta")),
        batch_size=500,
    )
    cm = confusion_matrix(test.labels, test.predictions, len(data.classes))
    report = per_class_report(cm, data.classes)
    results = meta.get("results", {})
    metadata = {k: v for k, v in meta.items() if k not in ("results", "recipe")}
    metadata.update(
        {
            "bundled": True,
            "test_accuracy": test.accuracy,
            "val_accuracy": results.get("best_val_accuracy"),
            "run_id": None,
        }
    )

    import mlflow

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    proto = export_onnx(model, tmp / "scratch.onnx", metadata)
    sample = np.asarray(data.images["test"][:64]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    parity = onnx_parity(model, proto, sample, tta=bool(meta.get("tta")))
    shutil.rmtree(tmp)
    mlflow.onnx.save_model(
        proto,
        str(tmp),
        signature=onnx_signature(len(data.classes)),
        input_example={"image": sample[:2]},
        metadata=metadata,
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
    )
    metrics = {
        "trained_with": command,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "val_accuracy": results.get("best_val_accuracy"),
        "train_seconds": results.get("train_seconds"),
        "epochs": len(results.get("history", [])),
        "onnx_max_abs_diff": parity,
        "per_class": report.set_index("class").round(4).to_dict(orient="index"),
        "data_digest": data.digest,
        "data_source": data.manifest["source"],
    }
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # The same evaluation files a training run logs, so the app's model page reads either alike.
    from cifar.engine import EpochMetrics
    from cifar.plots import confusion_matrix_figure, training_curves

    (tmp / "per_class.csv").write_text(report.to_csv(index=False, float_format="%.4f"))
    confusion_matrix_figure(cm, data.classes, "Test split").savefig(tmp / "confusion_matrix.png", dpi=80)
    history = [EpochMetrics(**h) for h in results.get("history", [])]
    if history:
        training_curves(history, results.get("best_epoch")).savefig(tmp / "training_curves.png", dpi=80)
    (tmp / "recipe.json").write_text(json.dumps(meta.get("recipe", {}), indent=2))
    (tmp / "README.md").write_text(model_card(meta, metrics, report, command))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return metrics


def model_card(meta: dict, metrics: dict, report, command: str, trust: dict | None = None) -> str:
    recipe = meta.get("recipe", {})
    int8 = bool(metrics.get("quantization"))
    parity_of = " (the float model it was quantized from)" if int8 else ""
    quantized = " and `python -m cifar.bundle quantize`" if int8 else ""
    rows = "\n".join(
        f"| {r['class']} | {r['recall']:.1%} | {r['precision']:.1%} | {r['f1']:.3f} |"
        for r in report.to_dict(orient="records")
    )
    command = command or metrics.get("trained_with", "")
    return f"""# Bundled model: `{meta["model"]}` (width {meta["width"]}{", int8" if int8 else ""})

The model a fresh clone serves until you register your own (`python register.py --import-bundled`,
run by `make app` on an empty store). An MLflow ONNX model: loads with `mlflow.pyfunc.load_model`
or ONNX Runtime, without torch and without unpickling.

- **Data**: CIFAR-10 (JPEG copy, `{metrics["data_source"]}`), cache digest `{metrics["data_digest"][:12]}`;
  45,000 training / 5,000 validation (stratified, seed 0) / 10,000 test images.
- **Recipe**: `experiments/{recipe.get("name", "?")}.yaml` with model.width={meta["width"]}, {metrics["epochs"]} epochs
  (full recipe in `recipe.json`): {recipe.get("model", {})}, {recipe.get("optim", {})},
  {recipe.get("augment", {})}, label smoothing {recipe.get("train", {}).get("label_smoothing")}, flip TTA in the graph.
- **Trained with**: `{command or "python train.py --experiment NAME --save-dir DIR"}`
  ({metrics["train_seconds"]:.1f} s of training), then `python -m cifar.bundle build --weights DIR`{quantized}.
- **Accuracy** (measured by `cifar.bundle {"quantize" if int8 else "build"}` on this machine, test split, once):
  **{metrics["test_accuracy"]:.2%}** top-1; validation {metrics["val_accuracy"]:.2%}
  (the epoch was chosen on validation).
- ONNX Runtime vs PyTorch logits: max |diff| {metrics["onnx_max_abs_diff"]:.1e} on 64 test images{parity_of}.
{_int8_lines(metrics)}
| class | recall (accuracy) | precision | F1 |
|---|---|---|---|
{rows}

## Known limits
- Trained and tested on quality-75 JPEGs of 32×32 images; every input is reduced to 32×32, so
  fine detail in a photo is lost. Cats and dogs are the most confused pair.
{_trust_lines(trust)}
- Accuracy on the canonical (PNG-quality) CIFAR-10 test set was not measured here.
"""


def _int8_lines(metrics: dict) -> str:
    q = metrics.get("quantization")
    if not q:
        return ""
    return (
        f"- **int8** (`python -m cifar.bundle quantize`): ONNX Runtime static quantization calibrated on "
        f"{q['calibration_images']} validation images; test accuracy {q['float_test_accuracy']:.2%} as float, "
        f"{metrics['test_accuracy']:.2%} as int8; the two give the same label to {q['val_agreement']:.2%} of "
        f"validation images. A quarter of the float file's size; how much faster depends on the CPU "
        "(int8 dot products: VNNI/AMX), see `benchmarks/RESULTS.md`.\n"
    )


def _trust_lines(trust: dict | None) -> str:
    if not trust:
        return "- It always answers with one of the ten classes, even for photos of none of them."
    m = trust["metrics"]
    return (
        f"- It scores every image against the ten classes. `trust.json` (fitted on this cache's validation split "
        f"by `python -m cifar.calibrate`) adds a temperature of {trust['temperature']:.3f} (test ECE "
        f"{m['test_ece_uncalibrated']:.3f} → {m['test_ece_calibrated']:.3f}) and an out-of-distribution "
        f"threshold that accepts {trust['accept_rate']:.0%} of validation images: it flags "
        f"{1 - m['ood_false_accept_noise']:.0%} of noise images but only "
        f"{1 - m.get('ood_false_accept_fashion_mnist', float('nan')):.0%} of Fashion-MNIST clothing photos and "
        f'{1 - m["ood_false_accept_flat"]:.0%} of flat single-colour images as "none of these".'
    )


def quantize_bundle(bundle_dir: Path = BUNDLE_DIR, data_dir: Path | None = None, robustness_images: int = 500) -> dict:
    """Replace a float bundle by its int8 model, re-measured here: accuracy, per class, trust, corruptions."""
    import tempfile

    import onnx

    from cifar.calibrate import TRUST_FILE
    from cifar.data import ensure_cache
    from cifar.inference import Predictor
    from cifar.metrics import confusion_matrix, negative_log_likelihood, per_class_report, softmax
    from cifar.plots import confusion_matrix_figure
    from cifar.quantize import quantize_model
    from cifar.robustness import corruption_table, mean_corruption_accuracy, sample_test_split
    from cifar.tracking import save_onnx_model_folder

    bundle_dir = Path(bundle_dir)
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    if metrics.get("quantization"):
        raise CifarError(f"{bundle_dir} already holds an int8 model.")
    data = ensure_cache(data_dir)
    tmp = bundle_dir.with_name(bundle_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        q = quantize_model(bundle_dir / "model.onnx", data, Path(scratch))
        save_onnx_model_folder(onnx.load(str(q.path)), q.metadata, np.zeros((1, 3, 32, 32), np.float32), tmp)
        corruption = None
        if robustness_images > 0:
            images, sample_labels = sample_test_split(data, robustness_images)
            corruption = mean_corruption_accuracy(corruption_table(Predictor(q.path).logits, images, sample_labels))
    labels = np.asarray(data.labels["test"])
    cm = confusion_matrix(labels, q.test_logits.argmax(1), len(data.classes))
    report = per_class_report(cm, data.classes)
    metrics.update(
        {
            "test_accuracy": q.test_accuracy,
            "test_loss": negative_log_likelihood(softmax(q.test_logits), labels),
            "val_accuracy": q.val_accuracy,
            "per_class": report.set_index("class").round(4).to_dict(orient="index"),
            "quantization": {
                **q.metadata["quantization"],
                "float_test_accuracy": metrics["test_accuracy"],
                "val_agreement": q.val_agreement,
            },
        }
    )
    if corruption is not None:
        metrics["mean_corruption_accuracy"] = corruption
        metrics["mean_corruption_accuracy_note"] = (
            f"python -m cifar.bundle quantize: 7 corruptions x 5 severities, {robustness_images} test images"
        )
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / TRUST_FILE).write_text(json.dumps(q.trust.to_dict(), indent=2))
    (tmp / "per_class.csv").write_text(report.to_csv(index=False, float_format="%.4f"))
    confusion_matrix_figure(cm, data.classes, "Test split (int8)").savefig(tmp / "confusion_matrix.png", dpi=80)
    for keep in ("recipe.json", "training_curves.png"):
        if (bundle_dir / keep).is_file():
            shutil.copy2(bundle_dir / keep, tmp / keep)
    meta = {**q.metadata, "recipe": json.loads((bundle_dir / "recipe.json").read_text())}
    (tmp / "README.md").write_text(model_card(meta, metrics, report, "", q.trust.to_dict()))
    shutil.rmtree(bundle_dir)
    tmp.rename(bundle_dir)
    return metrics


def import_bundled(bundle_dir: Path | None = None, name: str = MODEL_NAME) -> tuple[str, bool]:
    """Register the repository's bundled model (once) and make it production if there is none.

    Its run (experiment ``bundled-model``) carries the accuracy measured when it was built.
    Returns (version, whether it is production now).
    """
    import mlflow
    import onnx
    import yaml

    from cifar.registry import (
        PRODUCTION,
        _client,
        _has_model,
        _sync_stage,
        production_version,
        registry_lock,
        trust_tags,
    )
    from cifar.tracking import log_onnx_model

    folder = Path(bundle_dir or BUNDLE_DIR)
    if not (folder / "MLmodel").is_file():
        raise CifarError(f"no bundled model in {folder} (expected an MLflow model folder with MLmodel).")
    metrics = json.loads((folder / "metrics.json").read_text())
    metadata = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("metadata") or {}
    client = _client()
    with registry_lock():
        existing = client.search_model_versions(f"name='{name}' and tags.source='bundled'") if _has_model(name) else []
        if existing:
            version = existing[0].version
        else:
            proto = onnx.load(str(folder / "model.onnx"))
            example = np.zeros((1, 3, 32, 32), np.float32)
            mlflow.set_experiment("bundled-model")
            with mlflow.start_run(run_name="bundled-model") as run:
                mlflow.log_metrics(
                    {"best_val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"]}
                )
                mlflow.log_artifact(str(folder / "README.md"), "bundle")
                for file, artifact_dir in (
                    ("per_class.csv", "evaluation"),
                    ("confusion_matrix.png", "evaluation"),
                    ("training_curves.png", "plots"),
                ):
                    if (folder / file).is_file():
                        mlflow.log_artifact(str(folder / file), artifact_dir)
                mlflow.log_dict(metrics, "bundle/metrics.json")
                uri = log_onnx_model(proto, metadata, example)
                trust = {}
                if (folder / "trust.json").is_file():  # calibration made by python -m cifar.calibrate
                    client.log_model_artifact(uri.removeprefix("models:/"), str(folder / "trust.json"))
                    trust = json.loads((folder / "trust.json").read_text()).get("metrics", {})
                    mlflow.log_metrics(trust)
                mlflow.set_tags({"model_uri": uri, "source": "bundled", "data_digest": metrics["data_digest"]})
            tags = {
                "source": "bundled",
                "run_id": run.info.run_id,
                "val_accuracy": f"{metrics['val_accuracy']:.6f}",
                "test_accuracy": f"{metrics['test_accuracy']:.6f}",
                "data_digest": metrics["data_digest"],
                "experiment": "bundled-model",
                "study": "",
                "precision": metadata.get("precision", "float32"),
                **trust_tags(trust, metrics.get("mean_corruption_accuracy")),
            }
            version = mlflow.register_model(uri, name, tags=tags).version
            client.update_model_version(
                name,
                version,
                description=(
                    "Bundled with the repository (models/bundled/README.md): "
                    f"test accuracy {metrics['test_accuracy']:.4f}."
                ),
            )
        promoted = False
        if production_version(name) is None:
            client.set_registered_model_alias(name, PRODUCTION, version)
            _sync_stage(name)
            promoted = True
    return str(version), promoted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar.bundle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="weights folder -> models/bundled/")
    build.add_argument("--weights", type=Path, required=True, help="folder with model.safetensors + model_config.json")
    build.add_argument("--out", type=Path, default=BUNDLE_DIR)
    build.add_argument("--data-dir", type=Path)
    build.add_argument("--trained-with", default="", help="the training command and its machine (for the card)")
    quantize = sub.add_parser("quantize", help="replace the bundled float model by its int8 model, re-measured")
    quantize.add_argument("--bundle", type=Path, default=BUNDLE_DIR)
    quantize.add_argument("--data-dir", type=Path)
    quantize.add_argument("--robustness-images", type=int, default=500)
    args = parser.parse_args(argv)
    if args.command == "quantize":
        metrics = quantize_bundle(args.bundle, args.data_dir, args.robustness_images)
        q = metrics["quantization"]
        print(
            f"Bundled model in {args.bundle} is int8: test accuracy {metrics['test_accuracy']:.4f} "
            f"(float {q['float_test_accuracy']:.4f}), same label on {q['val_agreement']:.2%} of validation images"
        )
        return 0
    metrics = build_bundle(args.weights, args.out, args.data_dir, args.trained_with)
    print(f"Bundled model in {args.out}: test accuracy {metrics['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

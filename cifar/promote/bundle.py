"""The model shipped with the repository (``models/bundled/``), so a fresh clone serves predictions.

``python -m cifar bundle build --weights DIR`` turns a training's safetensors weights (from
``train.py --save-dir``) into an MLflow model folder with the served graph (``cifar.contract.schema``),
its constants fitted on this machine's cache, and a model card measured on the test split.
``quantize`` replaces it by its int8 model, re-measured. ``register.py --import-bundled`` puts it
in the registry.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from cifar.cli import run_cli
from cifar.config import PROJECT_ROOT
from cifar.contract import schema
from cifar.contract.gallery import SAMPLES_FOLDER, write_samples
from cifar.contract.registered_model import MODEL_NAME, VersionTags
from cifar.data import ensure_cache
from cifar.errors import CifarError
from cifar.promote.registry import (
    _client,
    _has_model,
    describe_registered_model,
    production_version,
    registry_lock,
    settle,
)
from cifar.serve.inference import Predictor
from cifar.tracking import log_onnx_model, save_onnx_model_folder
from cifar.tracking.names import mlflow_metrics
from cifar.tracking.store import _mlflow

BUNDLE_DIR = PROJECT_ROOT / "models" / "bundled"


def build_bundle(
    weights_dir: Path, out_dir: Path = BUNDLE_DIR, data_dir: Path | None = None, command: str = ""
) -> dict:
    """Weights -> a bundle folder: the served graph fitted on this cache, measured, with its card."""
    import torch  # lazy: the slim app venv (register.py --import-bundled) has no torch

    from cifar.run.calibration import serve_model  # lazy: imports torch; not in the slim app's deploy tree
    from cifar.run.export import load_weights  # lazy: imports torch; not in the slim app's deploy tree

    model, meta = load_weights(weights_dir)
    data = ensure_cache(data_dir)
    if meta.get("data_digest") and meta["data_digest"] != data.digest:
        print(f"note: weights were trained on data {meta['data_digest'][:12]}, evaluating on {data.digest[:12]}")
    results = meta.get("results", {})
    dropped = ("results", "recipe", "trust", "recovered_from", "trained_with", "input")
    metadata = {k: v for k, v in meta.items() if k not in dropped}
    metadata.update(
        {
            "contract": schema.describe(meta["classes"]),
            "bundled": True,
            "val_accuracy": results.get("best_val_accuracy"),
            "run_id": None,
        }
    )
    served = serve_model(model, data, metadata, torch.device("cpu"), batch_size=500)
    history = results.get("history", [])
    metrics = {
        "trained_with": command or meta.get("trained_with", ""),
        "val_accuracy": results.get("best_val_accuracy"),
        "train_seconds": results.get("train_seconds"),
        "epochs": len(history) or results.get("epochs"),
        "onnx_max_abs_diff": served.parity,
        **({"recovered_from": meta["recovered_from"]} if meta.get("recovered_from") else {}),
    }
    tmp = _fresh(out_dir)
    _write_bundle(tmp, served.proto, served.metadata, data, metrics, meta.get("recipe", {}), served.calibration)
    if history:
        from cifar.engine import EpochMetrics  # lazy: imports torch, which the slim app venv lacks
        from cifar.plots import training_curves  # lazy: the slim app venv has no matplotlib

        curves = [EpochMetrics(**h) for h in history]
        training_curves(curves, results.get("best_epoch")).savefig(tmp / "training_curves.png", dpi=80)
    elif (out_dir / "training_curves.png").is_file():  # recovered weights: the original training's curves
        shutil.copy2(out_dir / "training_curves.png", tmp / "training_curves.png")
    return _replace(tmp, out_dir)


def quantize_bundle(bundle_dir: Path = BUNDLE_DIR, data_dir: Path | None = None, robustness_images: int = 500) -> dict:
    """Replace a float bundle by its int8 model, re-measured here: accuracy, per class, trust, corruptions."""
    import onnx  # lazy: onnx takes ~0.8 s; `register.py --help` imports this module and skips it

    from cifar.assess.quantize import quantize_model  # lazy: imports torch; not in the slim app's deploy tree

    bundle_dir = Path(bundle_dir)
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    if metrics.get("quantization"):
        raise CifarError(f"{bundle_dir} already holds an int8 model.")
    data = ensure_cache(data_dir)
    tmp = _fresh(bundle_dir)
    with tempfile.TemporaryDirectory() as scratch:
        q = quantize_model(bundle_dir / "model.onnx", data, Path(scratch))
        metrics["quantization"] = {
            **q.metadata["quantization"],
            "float_test_accuracy": metrics["test_accuracy"],
            "val_agreement": q.val_agreement,
        }
        metrics["val_accuracy"] = q.val_accuracy
        recipe = json.loads((bundle_dir / "recipe.json").read_text())
        _write_bundle(tmp, onnx.load(str(q.path)), q.metadata, data, metrics, recipe, None, robustness_images)
    if (bundle_dir / "training_curves.png").is_file():
        shutil.copy2(bundle_dir / "training_curves.png", tmp / "training_curves.png")
    return _replace(tmp, bundle_dir)


def _fresh(out_dir: Path) -> Path:
    tmp = Path(out_dir).with_name(Path(out_dir).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _replace(tmp: Path, out_dir: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return json.loads((out_dir / "metrics.json").read_text())


def _write_bundle(
    folder: Path, proto, metadata: dict, data, metrics: dict, recipe: dict, calibration, robustness_images: int = 0
) -> None:
    """The MLflow model folder and its card, every figure measured through the saved graph on ``data``."""
    from cifar.metrics import confusion_matrix, per_class_report  # lazy: not in the slim app's deploy tree
    from cifar.plots import confusion_matrix_figure  # lazy: the slim app venv has no matplotlib

    save_onnx_model_folder(proto, metadata, np.asarray(data.images["val"][:2]), folder)
    served = Predictor.from_uri(str(folder))
    labels = np.asarray(data.labels["test"])
    predicted = served.predicted_classes(np.asarray(data.images["test"]))
    cm = confusion_matrix(labels, predicted, len(data.classes))
    report = per_class_report(cm, data.classes)
    trust = served.trust.to_dict()
    metrics.update(
        {
            "test_accuracy": float((predicted == labels).mean()),
            "per_class": report.set_index("class").round(4).to_dict(orient="index"),
            "trust": trust,
            "data_digest": data.digest,
            "data_source": data.manifest["source"],
        }
    )
    if robustness_images > 0:
        # lazy: the slim app's deploy tree has no cifar/assess
        from cifar.assess.robustness import corruption_table, mean_corruption_accuracy, sample_test_split

        images, sample_labels = sample_test_split(data, robustness_images)
        metrics["mean_corruption_accuracy"] = mean_corruption_accuracy(
            corruption_table(served.predicted_classes, images, sample_labels)
        )
        metrics["mean_corruption_accuracy_note"] = (
            f"python -m cifar bundle quantize: 7 corruptions x 5 severities, {robustness_images} test images"
        )
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "per_class.csv").write_text(report.to_csv(index=False, float_format="%.4f"))
    title = "Test split (int8)" if metadata.get("precision") == "int8" else "Test split"
    confusion_matrix_figure(cm, data.classes, title).savefig(folder / "confusion_matrix.png", dpi=80)
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=2))
    write_samples(data.images["test"], labels, data.classes, folder / SAMPLES_FOLDER)
    (folder / "README.md").write_text(model_card(metadata, metrics, report, recipe))


def model_card(meta: dict, metrics: dict, report, recipe: dict) -> str:
    int8 = bool(metrics.get("quantization"))
    parity_of = " (the float model it was quantized from)" if int8 else ""
    quantized = " and `python -m cifar bundle quantize`" if int8 else ""
    rows = "\n".join(
        f"| {r['class']} | {r['recall']:.1%} | {r['precision']:.1%} | {r['f1']:.3f} |"
        for r in report.to_dict(orient="records")
    )
    translate = meta.get("tta_translate")
    tta = f"flip + {translate}-pixel translate TTA" if translate else "flip TTA" if meta.get("tta") else "no TTA"
    recovered = metrics.get("recovered_from")
    lineage = (
        "\n- **Weights**: the float weights of that training were not kept; they were read back from the "
        f"earlier int8 bundle ({recovered}), then `python -m cifar bundle build --weights DIR`{quantized} "
        "made this one."
        if recovered
        else f", then `python -m cifar bundle build --weights DIR`{quantized}."
    )
    return f"""# Bundled model: `{meta["model"]}` (width {meta["width"]}{", int8" if int8 else ""})

The model a fresh clone serves until you register your own (`python register.py --import-bundled`,
run by `make app` on an empty store). An MLflow ONNX model that answers for any client
(`mlflow models serve`, `mlflow.pyfunc`, ONNX Runtime): uint8 images (N×32×32×3) in; `label`,
calibrated `probabilities`, `in_distribution`, `ood_score` and `logits` out (`cifar/run/export.py`).

- **Data**: CIFAR-10 (JPEG copy, `{metrics["data_source"]}`), cache digest `{metrics["data_digest"][:12]}`;
  45,000 training / 5,000 validation (stratified, seed 0) / 10,000 test images.
- **Recipe**: `experiments/{recipe.get("name", "?")}.yaml` with model.width={meta["width"]}, {metrics["epochs"]} epochs
  (full recipe in `recipe.json`): {recipe.get("model", {})}, {recipe.get("optim", {})},
  {recipe.get("augment", {})}, label smoothing {recipe.get("train", {}).get("label_smoothing")}, {tta} in the graph.
- **Trained with**: `{metrics.get("trained_with") or "python train.py --experiment NAME --save-dir DIR"}`
  ({metrics.get("train_seconds") or 0:.1f} s of training){lineage}
- **Accuracy** (measured by `cifar.promote.bundle {"quantize" if int8 else "build"}` on this cache, test split, once,
  through the saved graph): **{metrics["test_accuracy"]:.2%}** top-1; validation {metrics["val_accuracy"]:.2%}.
- ONNX Runtime vs PyTorch logits: max |diff| {metrics["onnx_max_abs_diff"]:.1e} on 64 validation images{parity_of}.
{_int8_lines(metrics)}{_corruption_line(metrics)}
| class | recall (accuracy) | precision | F1 |
|---|---|---|---|
{rows}

## How far to trust it
{_trust_lines(metrics["trust"])}

## Known limits
- Trained and tested on quality-75 JPEGs of 32×32 images; every input is reduced to 32×32, so
  fine detail in a photo is lost. Cats and dogs are the most confused pair.
- Accuracy on the canonical (PNG-quality) CIFAR-10 test set was not measured here.
"""


def _corruption_line(metrics: dict) -> str:
    if "mean_corruption_accuracy" not in metrics:
        return ""
    return (
        f"- **Under corruptions**: {metrics['mean_corruption_accuracy']:.2%} on average "
        f"({metrics['mean_corruption_accuracy_note']}).\n"
    )


def _int8_lines(metrics: dict) -> str:
    q = metrics.get("quantization")
    if not q:
        return ""
    return (
        f"- **int8** (`python -m cifar bundle quantize`): ONNX Runtime static quantization calibrated on "
        f"{q['calibration_images']} validation images, the contract's head left in float; test accuracy "
        f"{q['float_test_accuracy']:.2%} as float, {metrics['test_accuracy']:.2%} as int8; the two give the same "
        f"label to {q['val_agreement']:.2%} of validation images. How much faster depends on the CPU "
        "(int8 dot products: VNNI/AMX), see `benchmarks/RESULTS.md`.\n"
    )


def _trust_lines(trust: dict) -> str:
    m = trust["metrics"]
    sets = [k.removeprefix("ood_auroc_") for k in m if k.startswith("ood_auroc_")]
    rows = "\n".join(
        f"| {name.replace('_', ' ')} | {m['ood_auroc_' + name]:.3f} | {m['ood_false_accept_' + name]:.1%} |"
        for name in sets
    )
    missing = "".join(f"\n- {name}: {why}" for name, why in trust.get("not_measured", {}).items())
    return f"""Fitted by `cifar.run.calibration` on this cache (training and validation images only) and stored as
constants of the graph:
- temperature {trust["temperature"]:.3f}: test ECE {m["test_ece_uncalibrated"]:.3f} → {m["test_ece_calibrated"]:.3f},
  NLL {m["test_nll_uncalibrated"]:.3f} → {m["test_nll_calibrated"]:.3f};
- "none of these": the Mahalanobis distance of the image's features (every stage's mean activation
  and the penultimate vector, fitted on {trust["fit_images"]:,} training images) to the nearest class;
  the threshold accepts {trust["accept_rate"]:.0%} of validation images and
  {m["ood_accept_rate_in"]:.2%} of the test split.

| out-of-distribution set | AUROC | accepted as CIFAR-10 at the threshold |
|---|---|---|
{rows}
{missing}"""


def import_bundled(bundle_dir: Path | None = None, name: str = MODEL_NAME) -> tuple[str, bool]:
    """Register the repository's bundled model (once) and make it production if there is none.

    Its run (experiment ``bundled-model``) carries the accuracy measured when it was built.
    Returns (version, whether it is production now).
    """
    import onnx  # lazy: onnx takes ~0.8 s; `register.py --help` imports this module and skips it

    mlflow = _mlflow()
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
            example = mlflow.models.Model.load(str(folder)).load_input_example(str(folder))["image"]
            mlflow.set_experiment("bundled-model")
            with mlflow.start_run(run_name="bundled-model") as run:
                mlflow.log_artifact(str(folder / "README.md"), "bundle")
                for file, artifact_dir in (
                    ("per_class.csv", "evaluation"),
                    ("confusion_matrix.png", "evaluation"),
                    ("training_curves.png", "plots"),
                ):
                    if (folder / file).is_file():
                        mlflow.log_artifact(str(folder / file), artifact_dir)
                mlflow.log_dict(metrics, "bundle/metrics.json")
                if (folder / SAMPLES_FOLDER).is_dir():
                    mlflow.log_artifacts(str(folder / SAMPLES_FOLDER), SAMPLES_FOLDER)
                uri = log_onnx_model(proto, metadata, example)
                trust = (metadata.get("trust") or {}).get("metrics", {})  # what the graph's constants do
                scores = {"best_val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"]}
                mlflow.log_metrics(mlflow_metrics({**scores, **trust}), model_id=uri.removeprefix("models:/"))
                mlflow.set_tags({"model_uri": uri, "source": "bundled", "data_digest": metrics["data_digest"]})
            tags = VersionTags(
                source="bundled",
                run_id=run.info.run_id,
                val_accuracy=metrics["val_accuracy"],
                test_accuracy=metrics["test_accuracy"],
                data_digest=metrics["data_digest"],
                experiment="bundled-model",
                precision=metadata.get("precision", "float32"),
            ).with_trust(trust, metrics.get("mean_corruption_accuracy"))
            version = mlflow.register_model(uri, name, tags=tags.to_tags()).version
            describe_registered_model(name)
            client.update_model_version(
                name,
                version,
                description=(
                    "Bundled with the repository (models/bundled/README.md): "
                    f"test accuracy {metrics['test_accuracy']:.4f}."
                ),
            )
        promoted = production_version(name) is None
        if promoted:
            client.set_model_version_tag(name, version, "promotion", "won")
            settle(name)
    return str(version), promoted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar bundle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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

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


def model_card(meta: dict, metrics: dict, report, command: str) -> str:
    recipe = meta.get("recipe", {})
    rows = "\n".join(
        f"| {r['class']} | {r['recall']:.1%} | {r['precision']:.1%} | {r['f1']:.3f} |"
        for r in report.to_dict(orient="records")
    )
    return f"""# Bundled model: `{meta["model"]}` (width {meta["width"]})

The model a fresh clone serves until you register your own (`python register.py --import-bundled`,
run by `make app` on an empty store). An MLflow ONNX model: loads with `mlflow.pyfunc.load_model`
or ONNX Runtime, without torch and without unpickling.

- **Data**: CIFAR-10 (JPEG copy, `{metrics["data_source"]}`), cache digest `{metrics["data_digest"][:12]}`;
  45,000 training / 5,000 validation (stratified, seed 0) / 10,000 test images.
- **Recipe**: `experiments/{recipe.get("name", "?")}.yaml` with model.width={meta["width"]}, {metrics["epochs"]} epochs
  (full recipe in `recipe.json`): {recipe.get("model", {})}, {recipe.get("optim", {})},
  {recipe.get("augment", {})}, label smoothing {recipe.get("train", {}).get("label_smoothing")}, flip TTA in the graph.
- **Trained with**: `{command or "python train.py --experiment best --set model.width=2.0 --epochs 80 --save-dir DIR"}`
  on an NVIDIA H100 ({metrics["train_seconds"]:.1f} s of training), then `python -m cifar.bundle build --weights DIR`.
- **Accuracy** (measured by `cifar.bundle build` on this machine, test split, once):
  **{metrics["test_accuracy"]:.2%}** top-1; validation {metrics["val_accuracy"]:.2%}
  (the epoch was chosen on validation).
- ONNX Runtime vs PyTorch logits: max |diff| {metrics["onnx_max_abs_diff"]:.1e} on 64 test images.

| class | recall (accuracy) | precision | F1 |
|---|---|---|---|
{rows}

## Known limits
- Trained and tested on quality-75 JPEGs of 32×32 images; every input is reduced to 32×32, so
  fine detail in a photo is lost. Cats and dogs are the most confused pair.
- It always answers with one of the ten classes, even for photos of none of them.
- Accuracy on the canonical (PNG-quality) CIFAR-10 test set was not measured here.
"""


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
    build.add_argument("--trained-with", default="", help="the command that trained the weights (for the card)")
    args = parser.parse_args(argv)
    metrics = build_bundle(args.weights, args.out, args.data_dir, args.trained_with)
    print(f"Bundled model in {args.out}: test accuracy {metrics['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

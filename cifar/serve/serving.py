"""What the app needs from the registry, without torch: which model is production, and its report.

Everything here is plain functions, so the Streamlit page stays a thin layout over them.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from cifar.contract.gallery import SAMPLES_FOLDER, read_samples
from cifar.contract.images import decode_image
from cifar.contract.registered_model import (
    MODEL_NAME,
    PRODUCTION,
    VersionTags,
    dataset_of,
    production_uri,
    registered_version,
)
from cifar.errors import CifarError
from cifar.serve.inference import Predictor
from cifar.serve.occlusion import heatmap_overlay
from cifar.tracking.store import _mlflow, ping_tracking_server


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str
    experiment_id: str
    val_accuracy: str
    test_accuracy: str
    source: str
    tracking_uri: str
    trust: dict[str, str] = field(default_factory=dict)  # test_ece, ood_auroc, mean_corruption_accuracy, ...
    precision: str = "float32"  # or int8 (cifar.assess.quantize)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def run_link(self, ui_url: str | None = None) -> str | None:
        """A link to the source run in the MLflow UI, when its address is configured."""
        ui_url = ui_url if ui_url is not None else os.environ.get("MLFLOW_UI_URL", "")
        if not ui_url and self.tracking_uri.startswith("http"):
            ui_url = self.tracking_uri
        if not ui_url or not self.run_id:
            return None
        return f"{ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def production_model(name: str = MODEL_NAME) -> ModelInfo:
    """The registry's production version, or a CifarError that says what to run."""
    mlflow = _mlflow()
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        ping_tracking_server(uri)
    client = mlflow.MlflowClient()
    try:
        version = registered_version(production_uri(name), client)
    except mlflow.exceptions.MlflowException:
        if name != MODEL_NAME:
            dataset = dataset_of(name)
            raise CifarError(
                f"no production version of '{name}' in {uri}. Train one with python train.py --dataset {dataset} "
                f"and run python register.py --dataset {dataset}."
            ) from None
        raise CifarError(
            f"no production version of '{name}' in {uri}. Run: python register.py --import-bundled "
            "(the model shipped with the repository), or train one and run python register.py."
        ) from None
    aliases = tuple(sorted(version.aliases or (PRODUCTION,)))
    experiment_id = ""
    if version.run_id:
        try:
            experiment_id = client.get_run(version.run_id).info.experiment_id
        except mlflow.exceptions.MlflowException:
            pass
    tags = VersionTags.from_tags(version.tags)
    return ModelInfo(
        name,
        str(version.version),
        aliases,
        version.run_id or "",
        experiment_id,
        tags.shown("val_accuracy", "?"),
        tags.shown("test_accuracy", "?"),
        tags.source or "training run",
        uri,
        tags.trust(),
        tags.precision_name,
    )


def served_model_names() -> list[str]:
    """The registered models that have a production version, by name."""
    mlflow = _mlflow()
    if mlflow.get_tracking_uri().startswith(("http://", "https://")):
        ping_tracking_server(mlflow.get_tracking_uri())
    models = mlflow.MlflowClient().search_registered_models()
    return sorted(m.name for m in models if PRODUCTION in (m.aliases or {}))


def model_samples(run_id: str) -> list[tuple[str, Path, bytes]]:
    """(true class, file, PNG bytes) of the test images the model's run carries; none for a run without them."""
    try:
        folder = _mlflow().artifacts.download_artifacts(run_id=run_id, artifact_path=SAMPLES_FOLDER)
    except Exception:  # a run logged before runs carried samples: the page says so
        return []
    return [(label, path, path.read_bytes()) for label, path in read_samples(Path(folder))]


@dataclass(frozen=True)
class RunReport:
    per_class: object | None  # pandas DataFrame
    confusion_matrix_png: bytes | None
    training_curves_png: bytes | None


def run_report(run_id: str) -> RunReport:
    """Per-class table, confusion matrix and training curves from the source run's artifacts."""
    mlflow = _mlflow()

    def fetch(path: str) -> Path | None:
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))
        except Exception:  # a run without that artifact: the page says so
            return None

    csv = fetch("evaluation/per_class.csv")
    cm, curves = fetch("evaluation/confusion_matrix.png"), fetch("plots/training_curves.png")
    return RunReport(
        pd.read_csv(csv) if csv else None, cm.read_bytes() if cm else None, curves.read_bytes() if curves else None
    )


def time_one_prediction(predictor: Predictor, image_bytes: bytes, repeats: int = 20) -> float:
    """Median milliseconds for one image: decode, resize, predict."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_arrays([decode_image(image_bytes)])
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def thumbnail(array, size: int = 128) -> bytes:
    """The 32x32 model input, enlarged without smoothing, as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).resize((size, size), Image.Resampling.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def explanation_png(predictor: Predictor, array, size: int = 160, stride: int = 4) -> bytes:
    """Occlusion map of the predicted class over the 32x32 input, as PNG bytes."""
    buf = io.BytesIO()
    heatmap_overlay(array, predictor.explain(array, stride=stride), size).save(buf, format="PNG")
    return buf.getvalue()

"""The one image -> prediction path: ONNX Runtime on an MLflow ONNX model. Imports no torch.

Used by ``python -m cifar.predict``, the Streamlit app and the notebook. Preprocessing is
``cifar.preprocess.to_rgb32`` (the same code that built the training cache); normalization is
inside the ONNX graph, and the class names come from the model's own metadata.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar.errors import CifarError
from cifar.metrics import softmax
from cifar.preprocess import decode_image

DEFAULT_MODEL_URI = "models:/cifar10-classifier@production"
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    probabilities: np.ndarray = field(repr=False)

    def as_dict(self, path: str, model: str) -> dict[str, Any]:
        return {
            "path": path,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "top_k": [{"label": label, "probability": round(p, 6)} for label, p in self.top_k],
            "model": model,
        }


def _find_onnx(folder: Path) -> Path:
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        import yaml

        spec = yaml.safe_load(mlmodel.read_text()) or {}
        data = (spec.get("flavors", {}).get("onnx") or {}).get("data")
        if data and (folder / data).is_file():
            return folder / data
    candidates = sorted(folder.glob("*.onnx"))
    if not candidates:
        raise CifarError(f"{folder} holds no ONNX model (no MLmodel with an onnx flavor, no .onnx file).")
    return candidates[0]


class Predictor:
    """A loaded ONNX classifier, safe to share between threads.

    ONNX Runtime sessions allow concurrent ``run``, but each concurrent run keeps its own activation
    buffers in the session's memory arena; its intra-op pool already uses every core, so more runs at
    once than cores only add memory (32 threads grew it by 70 MB). A semaphore bounds them.
    """

    def __init__(self, onnx_path: Path, description: str = "") -> None:
        import onnxruntime as ort

        raw = Path(onnx_path).read_bytes()[:2]
        if raw in _PICKLE_MAGIC:
            raise CifarError(f"{onnx_path} is a Python pickle, not an ONNX model; refusing to load it.")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise CifarError(f"{onnx_path} is not a valid ONNX model ({str(exc).splitlines()[0][:200]}).") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.metadata: dict[str, Any] = json.loads(meta["cifar"])
            self.classes: list[str] = list(self.metadata["classes"])
        except (KeyError, ValueError):
            raise CifarError(f"{onnx_path} has no cifar metadata (class names); export it with cifar.export.") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, 32, 32]:
            raise CifarError(f"{onnx_path} expects input {inputs[0].shape}, not N x 3 x 32 x 32 images.")
        if outputs[0].shape[-1] != len(self.classes):
            raise CifarError(
                f"{onnx_path} outputs {outputs[0].shape[-1]} classes but its metadata names {len(self.classes)}."
            )
        self.input_name = inputs[0].name
        self._slots = threading.BoundedSemaphore(min(8, os.cpu_count() or 2))
        self.description = description or str(onnx_path)

    @classmethod
    def from_uri(cls, uri: str = DEFAULT_MODEL_URI) -> Predictor:
        """``models:/name@alias``, ``models:/name/N``, ``runs:/id/model``, a model folder or an .onnx file."""
        path = Path(uri).expanduser()
        if path.exists():
            return cls(_find_onnx(path) if path.is_dir() else path, description=str(path))
        if not uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")):
            raise CifarError(f"model '{uri}' is neither a local path nor a models:/ or runs:/ URI.")
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(uri))
        except Exception as exc:  # MLflow raises many types for a missing alias, run or server
            raise CifarError(
                f"cannot load model {uri} from {mlflow.get_tracking_uri()}: {str(exc).splitlines()[0][:300]}. "
                "If no model is registered yet, run: python register.py (or python register.py --import-bundled)."
            ) from None
        return cls(_find_onnx(local) if local.is_dir() else local, description=uri)

    def predict_arrays(self, images: list[np.ndarray] | np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Predict a batch of 32x32x3 uint8 images (see ``cifar.preprocess``)."""
        batch = np.stack(list(images)).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        if len(batch) == 0:
            return []
        with self._slots:
            logits = self.session.run(None, {self.input_name: batch})[0]
        probabilities = softmax(logits.astype(np.float64))
        k = max(1, min(top_k, len(self.classes)))
        out = []
        for row in probabilities:
            order = np.argsort(-row)[:k]
            out.append(
                Prediction(
                    self.classes[order[0]], float(row[order[0]]), [(self.classes[i], float(row[i])) for i in order], row
                )
            )
        return out

    def predict_files(self, paths: list[str | Path], top_k: int = 5, batch_size: int = 256) -> list[Prediction | str]:
        """Decode and predict files; an unreadable file yields its error message instead."""
        results: list[Prediction | str] = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            decoded: list[np.ndarray | str] = []
            for p in chunk:
                try:
                    decoded.append(decode_image(Path(p), str(p)))
                except CifarError as exc:
                    decoded.append(str(exc))
            good = [d for d in decoded if not isinstance(d, str)]
            predictions = iter(self.predict_arrays(good, top_k) if good else [])
            results.extend(d if isinstance(d, str) else next(predictions) for d in decoded)
        return results

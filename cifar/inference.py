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
from cifar.trust import TrustProfile, occlusion_map

DEFAULT_MODEL_URI = "models:/cifar10-classifier@production"
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    probabilities: np.ndarray = field(repr=False)  # calibrated: softmax(logits / temperature)
    in_distribution: bool = True  # False: "this does not look like any of the classes"
    ood_score: float | None = None  # the in-distribution score the threshold was applied to

    def as_dict(self, path: str, model: str) -> dict[str, Any]:
        return {
            "path": path,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "in_distribution": self.in_distribution,
            "top_k": [{"label": label, "probability": round(p, 6)} for label, p in self.top_k],
            "model": model,
        }


NOT_ONE_OF_THE_CLASSES = "this does not look like any of the 10 classes"


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


def _trust_profile(onnx_path: Path, metadata: dict[str, Any]) -> TrustProfile:
    """The ONNX metadata's profile, overridden by a ``trust.json`` beside the file (cifar.calibrate)."""
    sidecar = onnx_path.parent / "trust.json"
    raw, where = metadata.get("trust"), f"{onnx_path} metadata"
    if sidecar.is_file():
        where = str(sidecar)
        try:
            raw = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise CifarError(f"{sidecar} is not readable JSON ({exc}); rerun python -m cifar.calibrate.") from None
    try:
        return TrustProfile.from_dict(raw if isinstance(raw, dict) else None)
    except (TypeError, ValueError) as exc:
        raise CifarError(f"the trust profile in {where} is unusable ({exc}); rerun cifar.calibrate.") from None


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
        self.onnx_path = Path(onnx_path)
        self.trust = _trust_profile(self.onnx_path, self.metadata)
        self.input_name = inputs[0].name
        self._slots = threading.BoundedSemaphore(min(8, os.cpu_count() or 2))
        self.description = description or str(onnx_path)

    @classmethod
    def from_uri(cls, uri: str = DEFAULT_MODEL_URI) -> Predictor:
        """``models:/name@alias``, ``models:/name/N``, ``runs:/id/model``, a model folder or an .onnx file.

        A registry model is copied once and reused while the local SQLite store is unchanged
        (``cifar.modelcache``); ``description`` names the version an alias resolved to.
        """
        path = Path(uri).expanduser()
        if path.exists():
            return cls(_find_onnx(path) if path.is_dir() else path, description=str(path))
        if not uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")):
            raise CifarError(f"model '{uri}' is neither a local path nor a models:/ or runs:/ URI.")
        from cifar import modelcache

        found = modelcache.cached_copy(uri)
        if found is None:
            import mlflow

            try:
                found = modelcache.download_model(uri)
            except Exception as exc:  # MLflow raises many types for a missing alias, run or server
                raise CifarError(
                    f"cannot load model {uri} from {mlflow.get_tracking_uri()}: {str(exc).splitlines()[0][:300]}. "
                    "If no model is registered yet, run: python register.py (or python register.py --import-bundled)."
                ) from None
        local, resolved = found
        description = uri if resolved == uri else f"{uri} (version {resolved.rsplit('/', 1)[-1]})"
        return cls(_find_onnx(local) if local.is_dir() else local, description=description)

    def logits(self, images: list[np.ndarray] | np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Raw logits (before temperature) for N x 32 x 32 x 3 uint8 images."""
        images = np.asarray(images, np.uint8)
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
            with self._slots:
                out.append(self.session.run(None, {self.input_name: batch})[0].astype(np.float64))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, softmax(logits / temperature)."""
        return softmax(self.logits(images) / self.trust.temperature)

    def predict_arrays(self, images: list[np.ndarray] | np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Predict a batch of 32x32x3 uint8 images (see ``cifar.preprocess``)."""
        if len(images) == 0:
            return []
        logits = self.logits(np.stack(list(images)))
        probabilities = softmax(logits / self.trust.temperature)
        scores, accepted = self.trust.accepts(logits)
        k = max(1, min(top_k, len(self.classes)))
        out = []
        for row, score, ok in zip(probabilities, scores, accepted):
            order = np.argsort(-row)[:k]
            top = [(self.classes[i], float(row[i])) for i in order]
            out.append(Prediction(top[0][0], top[0][1], top, row, bool(ok), float(score)))
        return out

    def explain(self, image: np.ndarray, target: int | None = None, patch: int = 8, stride: int = 2) -> np.ndarray:
        """Occlusion sensitivity (32 x 32): how much covering each pixel lowers the predicted class."""
        if target is None:
            target = int(self.logits(image[None]).argmax())
        return occlusion_map(self.probabilities, image, target, patch, stride)

    def predict_files(self, paths: list[str | Path], top_k: int = 5, batch_size: int = 256) -> list[Prediction | str]:
        """Decode and predict files; an unreadable file yields its error message instead.

        The next chunk decodes on a thread while ONNX Runtime (which releases the GIL) scores this one.
        """
        from concurrent.futures import ThreadPoolExecutor

        chunks = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
        results: list[Prediction | str] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_decode_files, chunks[0]) if chunks else None
            for i in range(len(chunks)):
                decoded = pending.result()
                pending = pool.submit(_decode_files, chunks[i + 1]) if i + 1 < len(chunks) else None
                good = [d for d in decoded if not isinstance(d, str)]
                predictions = iter(self.predict_arrays(good, top_k) if good else [])
                results.extend(d if isinstance(d, str) else next(predictions) for d in decoded)
        return results


def _decode_files(paths: list[str | Path]) -> list[np.ndarray | str]:
    """Each file's 32x32x3 array, or its error message."""
    decoded: list[np.ndarray | str] = []
    for p in paths:
        try:
            decoded.append(decode_image(Path(p), str(p)))
        except CifarError as exc:
            decoded.append(str(exc))
    return decoded

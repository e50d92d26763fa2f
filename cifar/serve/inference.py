"""The one image -> prediction path: ONNX Runtime on an MLflow ONNX model. Imports no torch.

Used by ``python -m cifar predict``, the Streamlit app, evaluation and the notebook. Images
become the model's 32 x 32 uint8 input through ``cifar.contract.images`` (the code that also built
the training cache); everything after that, from normalisation to the calibrated probabilities
and "none of these", is inside the graph (``cifar.contract.schema``), so this module only reads the
graph's outputs: the same answer ``mlflow models serve`` gives.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml

from cifar.contract import schema
from cifar.contract.images import decode_image
from cifar.contract.registered_model import PRODUCTION_URI
from cifar.contract.trust import TrustProfile
from cifar.errors import CifarError
from cifar.serve import modelcache
from cifar.serve.occlusion import occlusion_map

DEFAULT_MODEL_URI = PRODUCTION_URI
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    probabilities: np.ndarray = field(repr=False)  # calibrated, as the graph outputs them
    in_distribution: bool = True  # False: "this does not look like any of the classes"
    ood_score: float | None = None  # distance to the nearest class; above the model's threshold -> False

    def as_dict(self, path: str, model: str) -> dict[str, Any]:
        return {
            "path": path,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "in_distribution": self.in_distribution,
            "ood_score": None if self.ood_score is None else round(self.ood_score, 6),
            "top_k": [{"label": label, "probability": round(p, 6)} for label, p in self.top_k],
            "model": model,
        }


NOT_ONE_OF_THE_CLASSES = "this does not look like any of the 10 classes"


def find_onnx(folder: Path) -> Path:
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        spec = yaml.safe_load(mlmodel.read_text()) or {}
        data = (spec.get("flavors", {}).get("onnx") or {}).get("data")
        if data and (folder / data).is_file():
            return folder / data
    candidates = sorted(folder.glob("*.onnx"))
    if not candidates:
        raise CifarError(f"{folder} holds no ONNX model (no MLmodel with an onnx flavor, no .onnx file).")
    return candidates[0]


def _check_contract(session, name: str, classes: list[str]) -> None:
    """The graph must follow ``cifar.contract.schema``."""
    inputs = session.get_inputs()
    outputs = {o.name: o for o in session.get_outputs()}
    if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or list(inputs[0].shape[1:]) != list(schema.IMAGE_SHAPE):
        raise CifarError(f"{name} expects input {inputs[0].type} {inputs[0].shape}, not N x 32 x 32 x 3 uint8 images.")
    missing = [o for o in schema.OUTPUTS if o not in outputs]
    if missing:
        raise CifarError(f"{name} has no {', '.join(missing)} output; export it with cifar.run.export.")
    width = outputs[schema.PROBABILITIES].shape[-1]
    if width != len(classes):
        raise CifarError(f"{name} outputs {width} classes but its metadata names {len(classes)}.")


IMAGE_CONTRACT = "uint8 RGB images, N x 32 x 32 x 3, values 0-255"


def image_batch(images: Any) -> np.ndarray:
    """``images`` as the graph's input (uint8 N x 32 x 32 x 3, N >= 1), or a CifarError naming the contract.

    Nothing is cast silently: a float image in [0, 1] would truncate to black and still get an answer
    (what ``mlflow models serve`` does with it), and NumPy wraps -1 to 255. Integers 0-255 convert exactly.
    """
    try:
        batch = np.asarray(images)
    except ValueError:  # nested sequences of different lengths
        raise CifarError(f"the images have different shapes; the model takes {IMAGE_CONTRACT}.") from None
    if batch.size == 0:
        raise CifarError(f"no images (an empty batch); the model takes {IMAGE_CONTRACT}, N >= 1.")
    if batch.ndim != 4 or batch.shape[1:] != schema.IMAGE_SHAPE:
        if batch.shape == schema.IMAGE_SHAPE:
            hint = " (one image: add the batch axis, image[None])"
        else:  # 64 x 64, channels first, grey: what decode_image makes of any picture is the model's input
            hint = " (cifar.contract.images.decode_image turns any picture into a 32 x 32 x 3 one)"
        raise CifarError(f"images of shape {batch.shape}; the model takes {IMAGE_CONTRACT}{hint}.")
    if batch.dtype == np.uint8:
        return batch
    if batch.dtype.kind in "iu":
        low, high = int(batch.min()), int(batch.max())
        if low >= 0 and high <= 255:
            return batch.astype(np.uint8)
        raise CifarError(f"pixel values {low} to {high}; the model takes {IMAGE_CONTRACT}.")
    advice = " (floats are not rounded: convert 0-255 values with .astype(np.uint8), [0, 1] values times 255)"
    raise CifarError(
        f"pixels of type {batch.dtype}; the model takes {IMAGE_CONTRACT}{advice if batch.dtype.kind == 'f' else ''}."
    )


class Predictor:
    """A loaded served model (``cifar.contract.schema``), safe to share between threads.

    ONNX Runtime sessions allow concurrent ``run``, but each concurrent run keeps its own activation
    buffers in the session's memory arena; its intra-op pool already uses every core, so more runs at
    once than cores only add memory (32 threads grew it by 70 MB). A semaphore bounds them.
    """

    def __init__(self, onnx_path: Path, description: str = "", source: str | None = None) -> None:
        """``description`` names the model in output; ``source`` is what the user gave (for messages)."""
        self.description = description or str(onnx_path)
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
            self.metadata: dict[str, Any] = json.loads(meta[schema.METADATA_KEY])
            self.classes: list[str] = list(self.metadata["classes"])
        except (KeyError, ValueError):
            raise CifarError(
                f"{onnx_path} has no cifar metadata (class names); export it with cifar.run.export."
            ) from None
        _check_contract(self.session, source or str(onnx_path), self.classes)
        try:  # the record of the graph's constants (written with them), for display
            self.trust = TrustProfile.from_dict(self.metadata.get("trust"))
        except (TypeError, ValueError) as exc:
            raise CifarError(
                f"the trust record in {onnx_path}'s metadata is unusable ({exc}); rerun python -m cifar calibrate."
            ) from None
        self.onnx_path = Path(onnx_path)
        self._slots = threading.BoundedSemaphore(min(8, os.cpu_count() or 2))

    @classmethod
    def from_uri(cls, uri: str = DEFAULT_MODEL_URI) -> Predictor:
        """``models:/name@alias``, ``models:/name/N``, ``runs:/id/model``, a model folder or an .onnx file.

        A registry model is copied once and reused while the local SQLite store is unchanged
        (``cifar.serve.modelcache``); ``description`` names the version an alias resolved to.
        """
        path = Path(uri).expanduser()
        if path.exists():
            return cls(find_onnx(path) if path.is_dir() else path, description=str(path), source=uri)
        if not uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")):
            raise CifarError(f"model '{uri}' is neither a local path nor a models:/ or runs:/ URI.")
        found = modelcache.cached_copy(uri)
        if found is None:
            import mlflow  # lazy: ~1 s; predict's warm model cache and the app's start skip it

            try:
                found = modelcache.download_model(uri)
            except Exception as exc:  # MLflow raises many types for a missing alias, run or server
                raise CifarError(
                    f"cannot load model {uri} from {mlflow.get_tracking_uri()}: {str(exc).splitlines()[0][:300]}. "
                    "If no model is registered yet, run: python register.py (or python register.py --import-bundled)."
                ) from None
        local, resolved = found
        description = uri if resolved == uri else f"{uri} (version {resolved.rsplit('/', 1)[-1]})"
        return cls(find_onnx(local) if local.is_dir() else local, description=description, source=uri)

    def run(self, images: list[np.ndarray] | np.ndarray, batch_size: int = 1000) -> dict[str, np.ndarray]:
        """The graph's outputs (``cifar.contract.schema.OUTPUTS``) for N x 32 x 32 x 3 uint8 images.

        Anything else is a ``CifarError`` naming the contract (``image_batch``). Any N >= 1: the graph
        runs ``batch_size`` images at a time, so memory stays that of one chunk.
        """
        images = image_batch(images)
        parts = []
        for start in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[start : start + batch_size])
            with self._slots:
                parts.append(self.session.run(list(schema.OUTPUTS), {schema.INPUT: batch}))
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(schema.OUTPUTS)}

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Raw logits (before the temperature)."""
        return self.run(images)[schema.LOGITS]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, as the graph outputs them."""
        return self.run(images)[schema.PROBABILITIES]

    def predicted_classes(self, images: np.ndarray) -> np.ndarray:
        """Class index of each image's ``label`` output."""
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[str(label)] for label in self.run(images)[schema.LABEL]], np.int64)

    def predict_arrays(self, images: list[np.ndarray] | np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Predict a batch of 32x32x3 uint8 images (see ``cifar.contract.images``)."""
        if len(images) == 0:
            return []
        out = self.run(images)
        k = max(1, min(top_k, len(self.classes)))
        predictions = []
        for i, row in enumerate(out[schema.PROBABILITIES]):
            order = np.argsort(-row)[:k]
            top = [(self.classes[j], float(row[j])) for j in order]
            label = str(out[schema.LABEL][i])
            confidence = float(row[self.classes.index(label)])
            predictions.append(
                Prediction(
                    label,
                    confidence,
                    top,
                    row,
                    bool(out[schema.IN_DISTRIBUTION][i]),
                    float(out[schema.OOD_SCORE][i]),
                )
            )
        return predictions

    def explain(self, image: np.ndarray, target: int | None = None, patch: int = 8, stride: int = 2) -> np.ndarray:
        """Occlusion sensitivity (32 x 32): how much covering each pixel lowers the predicted class."""
        if target is None:
            target = int(self.predicted_classes(image[None])[0])
        return occlusion_map(self.probabilities, image, target, patch, stride)

    def predict_files(self, paths: list[str | Path], top_k: int = 5, batch_size: int = 256) -> list[Prediction | str]:
        """Decode and predict files; an unreadable file yields its error message instead.

        The next chunk decodes on a thread while ONNX Runtime (which releases the GIL) scores this one.
        """
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

"""The served model's contract: one ONNX graph from a user's pixels to the answer the app shows.

    input   image            uint8    N x 32 x 32 x 3   RGB, as PIL and NumPy hold it
    output  label            string   N                 the most probable class
            probabilities    float32  N x C             calibrated: softmax(logits / temperature)
            in_distribution  bool     N                 False: "none of these classes"
            ood_score        float32  N                 distance to the nearest class (1 is typical);
                                                        above the threshold -> in_distribution False
            logits           float32  N x C             before the temperature

Everything in between is a node or a constant of the graph: the conversion to floats in [0, 1],
the training split's normalisation, the TTA the run evaluated with (flip, or flip + translate),
the network, the temperature, the out-of-distribution score and its threshold. ``mlflow models
serve``, ``mlflow.pyfunc``, plain ONNX Runtime and this project's ``Predictor`` therefore give the
same answer.

The network part of the graph ends in two tensors, ``net_logits`` and ``features`` (every
stage's mean activation and the penultimate vector, ``cifar.engine.models``); the head reads them.
``cifar.run.export`` builds the graph; this module holds only its names and its metadata, and
imports nothing heavy (the slim app reads it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

INPUT = "image"
LABEL, PROBABILITIES, IN_DISTRIBUTION, OOD_SCORE, LOGITS = (
    "label",
    "probabilities",
    "in_distribution",
    "ood_score",
    "logits",
)
OUTPUTS = (LABEL, PROBABILITIES, IN_DISTRIBUTION, OOD_SCORE, LOGITS)
IMAGE_SHAPE = (32, 32, 3)
VERSION = 2  # 1: float32 N x 3 x 32 x 32 in, logits out (models logged before 2026-12-02)
METADATA_KEY = "cifar"  # the ONNX metadata entry: classes, recipe, the trust record


def describe(classes: Sequence[str]) -> dict[str, Any]:
    """The contract as model metadata (MLmodel and the ONNX file): what goes in, what comes out."""
    return {
        "version": VERSION,
        "input": {"name": INPUT, "dtype": "uint8", "shape": [-1, *IMAGE_SHAPE], "layout": "NHWC RGB, 0-255"},
        "outputs": {
            LABEL: "string: the most probable class",
            PROBABILITIES: f"float32 N x {len(classes)}: calibrated, softmax(logits / temperature)",
            IN_DISTRIBUTION: "bool: false means the image looks like none of the classes",
            OOD_SCORE: "float32: Mahalanobis distance of the image's features to the nearest class; "
            "above the threshold means not in distribution",
            LOGITS: f"float32 N x {len(classes)}: before the temperature",
        },
        "in_graph": [
            "uint8 NHWC -> float32 NCHW in [0, 1]",
            "normalisation by the training split's mean and std",
            "the TTA the run evaluated with (flip, or flip + translate)",
            "temperature scaling (fitted on the validation split)",
            "out-of-distribution score (fitted on training images) and its threshold (validation split)",
            "class names",
        ],
    }


def model_description(classes: Sequence[str]) -> str:
    """The registered model's description (Markdown, shown on its MLflow page): what it is, what goes in and out."""
    spec = describe(classes)
    outputs = "\n".join(f"- `{name}`: {text}" for name, text in spec["outputs"].items())
    inside = "; ".join(spec["in_graph"])
    return (
        f"CIFAR-10 image classifier: one ONNX graph from a photo's pixels to the answer ({len(classes)} classes: "
        f"{', '.join(classes)}). The same graph answers `mlflow.pyfunc`, `mlflow models serve`, plain "
        "ONNX Runtime and the Streamlit app.\n\n"
        f"**Input** `{INPUT}`: uint8, N x 32 x 32 x 3, RGB 0-255 (NHWC, as PIL and NumPy hold an image).\n\n"
        f"**Outputs**\n{outputs}\n\n"
        f"**Inside the graph**: {inside}.\n\n"
        "**Aliases**: `production` is what the app serves; `previous` is what `python register.py --rollback` "
        "restores. A version is promoted on validation accuracy; its test accuracy is re-measured at "
        "registration, for the record only."
    )


def metadata_of(proto) -> dict[str, Any]:
    """The ``cifar`` metadata entry of a graph ({} when it has none)."""
    raw = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def is_served(proto) -> bool:
    """Whether a graph follows this contract (uint8 images in, the five outputs out), not the old format."""
    from onnx import TensorProto  # lazy: onnx takes ~0.8 s; the app imports this module at start

    inputs, outputs = proto.graph.input, {o.name for o in proto.graph.output}
    return len(inputs) == 1 and inputs[0].type.tensor_type.elem_type == TensorProto.UINT8 and set(OUTPUTS) <= outputs


def set_metadata(proto, metadata: dict[str, Any]) -> None:
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = json.dumps(metadata)
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)

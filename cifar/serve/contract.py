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
stage's mean activation and the penultimate vector, ``cifar.models``); the head below reads
them. Names are importable without onnx (the slim app reads them); building or editing a graph
imports onnx.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
NET_LOGITS, FEATURES = "net_logits", "features"  # the network's outputs, inside the graph
METADATA_KEY = "cifar"  # the ONNX metadata entry: classes, recipe, the trust record
OPSET = 18
_P = "contract/"  # name prefix of the head's nodes and constants (cifar.assess.quantize leaves them in float)


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


@dataclass(frozen=True)
class Constants:
    """The fitted numbers the head is made of (``cifar.assess.calibrate`` fits them; this module writes them)."""

    temperature: float
    threshold: float  # on ood_score; above it an image is "none of these"
    whitening: np.ndarray  # D x D: z = normalised features @ whitening
    class_means: np.ndarray  # C x D, in whitened coordinates

    def tensors(self) -> dict[str, np.ndarray]:
        means = np.asarray(self.class_means, np.float32)
        return {
            "temperature": np.asarray(self.temperature, np.float32),
            "threshold": np.asarray(self.threshold, np.float32),
            # float16 halves the file (a 1,664-wide net: 5.5 MB instead of 11); distances move by ~1e-3
            "whitening": np.asarray(self.whitening, np.float16),
            "means_t": np.ascontiguousarray(means.T),
            "means_sq": (means.astype(np.float64) ** 2).sum(1).astype(np.float32),
            "inv_dim": np.asarray(1.0 / means.shape[1], np.float32),
        }


def _head(classes: Sequence[str], constants: Constants):
    """(nodes, initializers) computing the five outputs from ``net_logits`` and ``features``."""
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str, value: np.ndarray):
        return numpy_helper.from_array(np.asarray(value), _P + name)

    inits = [init(k, v) for k, v in constants.tensors().items()]
    inits += [
        helper.make_tensor(_P + "classes", TensorProto.STRING, [len(classes)], [c.encode() for c in classes]),
        init("axis1", np.array([1], np.int64)),
        init("two", np.asarray(2.0, np.float32)),
        init("eps", np.asarray(1e-12, np.float32)),
    ]

    def name(tensor: str) -> str:  # the head's own tensors are prefixed; its inputs and outputs are not
        return tensor if tensor in (NET_LOGITS, FEATURES, *OUTPUTS) else _P + tensor

    def node(op: str, inputs: list[str], output: str, **attrs):
        return helper.make_node(op, [name(i) for i in inputs], [name(output)], f"{_P}{output}/{op}", **attrs)

    nodes = [
        node("Div", [NET_LOGITS, "temperature"], "scaled"),
        node("Softmax", ["scaled"], PROBABILITIES, axis=1),
        node("ArgMax", [NET_LOGITS], "index", axis=1, keepdims=0),
        node("Gather", ["classes", "index"], LABEL, axis=0),
        node("Identity", [NET_LOGITS], LOGITS),
        # Mahalanobis distance to the nearest class on L2-normalised features (tied covariance)
        node("ReduceL2", [FEATURES, "axis1"], "norm", keepdims=1),
        node("Max", ["norm", "eps"], "norm_safe"),
        node("Div", [FEATURES, "norm_safe"], "unit"),
        node("Cast", ["whitening"], "whitening32", to=TensorProto.FLOAT),
        node("MatMul", ["unit", "whitening32"], "z"),
        node("Mul", ["z", "z"], "z2"),
        node("ReduceSum", ["z2", "axis1"], "zz", keepdims=1),
        node("MatMul", ["z", "means_t"], "zm"),
        node("Mul", ["zm", "two"], "zm2"),
        node("Sub", ["zz", "zm2"], "partial"),
        node("Add", ["partial", "means_sq"], "distances"),
        node("ReduceMin", ["distances", "axis1"], "nearest", keepdims=0),
        node("Mul", ["nearest", "inv_dim"], OOD_SCORE),
        node("LessOrEqual", [OOD_SCORE, "threshold"], IN_DISTRIBUTION),
    ]
    return nodes, inits


def _outputs(num_classes: int):
    from onnx import TensorProto, helper

    return [
        helper.make_tensor_value_info(LABEL, TensorProto.STRING, ["batch"]),
        helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", num_classes]),
        helper.make_tensor_value_info(IN_DISTRIBUTION, TensorProto.BOOL, ["batch"]),
        helper.make_tensor_value_info(OOD_SCORE, TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", num_classes]),
    ]


def attach_head(net, classes: Sequence[str], constants: Constants, metadata: dict[str, Any]):
    """The served model: ``net`` (image -> net_logits, features) with the head appended; returns a new proto."""
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(net)
    names = {o.name for o in proto.graph.output}
    if names != {NET_LOGITS, FEATURES}:
        raise ValueError(f"the network graph must output {NET_LOGITS} and {FEATURES}, not {sorted(names)}")
    nodes, inits = _head(classes, constants)
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(inits)
    del proto.graph.output[:]
    proto.graph.output.extend(_outputs(len(classes)))
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    return proto


def set_constants(proto, constants: Constants, metadata: dict[str, Any]) -> None:
    """Rewrite a served graph's fitted constants (and its metadata record with them) in place."""
    from onnx import numpy_helper

    fresh = {_P + k: v for k, v in constants.tensors().items()}
    found = set()
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.name in fresh:
            old = numpy_helper.to_array(tensor)
            if old.shape != fresh[tensor.name].shape:
                raise ValueError(f"{tensor.name}: shape {old.shape} cannot become {fresh[tensor.name].shape}")
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(fresh[tensor.name], tensor.name))
            found.add(tensor.name)
    if found != set(fresh):
        raise ValueError(f"not a served graph: constants {sorted(set(fresh) - found)} are missing")
    set_metadata(proto, metadata)


def constants_of(proto) -> Constants:
    """The fitted constants a served graph holds (what ``set_constants`` wrote)."""
    from onnx import numpy_helper

    t = {i.name.removeprefix(_P): numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.startswith(_P)}
    means = np.ascontiguousarray(t["means_t"].T)
    return Constants(float(t["temperature"]), float(t["threshold"]), t["whitening"], means)


def metadata_of(proto) -> dict[str, Any]:
    """The ``cifar`` metadata entry of a graph ({} when it has none)."""
    raw = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def is_served(proto) -> bool:
    """Whether a graph follows this contract (uint8 images in, the five outputs out), not the old format."""
    from onnx import TensorProto

    inputs, outputs = proto.graph.input, {o.name for o in proto.graph.output}
    return len(inputs) == 1 and inputs[0].type.tensor_type.elem_type == TensorProto.UINT8 and set(OUTPUTS) <= outputs


def set_metadata(proto, metadata: dict[str, Any]) -> None:
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = json.dumps(metadata)
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)


def head_nodes(proto) -> list[str]:
    """Names of the head's nodes (quantization leaves them in float)."""
    return [n.name for n in proto.graph.node if n.name.startswith(_P)]


def head_model(classes: Sequence[str], constants: Constants):
    """The head alone (net_logits, features -> the five outputs): applied to a network's outputs in fitting."""
    from onnx import TensorProto, helper

    dim = np.asarray(constants.whitening).shape[0]
    nodes, inits = _head(classes, constants)
    graph = helper.make_graph(
        nodes,
        "contract-head",
        [
            helper.make_tensor_value_info(NET_LOGITS, TensorProto.FLOAT, ["batch", len(classes)]),
            helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", dim]),
        ],
        _outputs(len(classes)),
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _session(proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def apply_head(
    classes: Sequence[str], constants: Constants, logits: np.ndarray, features: np.ndarray, batch_size: int = 5000
) -> dict[str, np.ndarray]:
    """The five outputs for a network's (logits, features): the same nodes the served graph runs."""
    session = _session(head_model(classes, constants))
    parts = [
        session.run(
            None,
            {
                NET_LOGITS: np.asarray(logits[i : i + batch_size], np.float32),
                FEATURES: np.asarray(features[i : i + batch_size], np.float32),
            },
        )
        for i in range(0, len(logits), batch_size)
    ]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(o.name for o in session.get_outputs())}


NetOutputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 images -> (logits, features)


def network_of(proto, batch_size: int = 500) -> NetOutputs:
    """A served graph's network part as a function (its logits and the features the head reads)."""
    import onnx
    from onnx import TensorProto, helper

    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, None))
    session = _session(exposed)

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = [], []
        for i in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[i : i + batch_size], np.uint8)
            out = session.run([LOGITS, FEATURES], {INPUT: batch})
            logits.append(out[0])
            features.append(out[1])
        return np.concatenate(logits), np.concatenate(features)

    return outputs

"""Trained model -> files that are data, not code: safetensors weights + JSON, and the served ONNX graph.

The served graph takes uint8 images as PIL and NumPy hold them (N x 32 x 32 x 3) and answers with
a label, calibrated probabilities and "none of these" (``cifar.contract.schema``). This module exports
its network part from PyTorch, ``image -> (net_logits, features)``, and attaches the head.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxscript import opset18 as op
from onnxscript import script
from safetensors.torch import load_file, save_file
from torch import nn

from cifar.contract import schema
from cifar.engine.models import create_model
from cifar.engine.steps import evaluate, tta_average

NET_LOGITS, FEATURES = "net_logits", "features"  # the network part's outputs, which the head reads
OPSET = 18
HEAD = "contract/"  # prefix of the head's nodes and constants: quantization leaves them in float


def model_metadata(model_name: str, width: float, classes: Sequence[str], mean, std, **extra: Any) -> dict[str, Any]:
    return {
        "model": model_name,
        "width": width,
        "classes": list(classes),
        "contract": schema.describe(classes),
        "normalization": {"mean": list(mean), "std": list(std), "in_graph": True},
        **extra,
    }


def save_weights(model: nn.Module, folder: Path, metadata: dict[str, Any]) -> Path:
    """``model.safetensors`` + ``model_config.json``: enough to rebuild the model without pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "model_config.json").write_text(json.dumps(metadata, indent=2))
    return folder / "model.safetensors"


def load_weights(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from ``model.safetensors`` + ``model_config.json`` (no pickle involved)."""
    metadata = json.loads((Path(folder) / "model_config.json").read_text())
    norm = metadata["normalization"]
    model = create_model(
        metadata["model"],
        num_classes=len(metadata["classes"]),
        width=metadata["width"],
        mean=norm["mean"],
        std=norm["std"],
    )
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.eval(), metadata


def tta_of(metadata: dict[str, Any]) -> tuple[bool, int]:
    """The test-time augmentation a model was evaluated with, hence served with: (flip, translate pixels)."""
    tta = bool(metadata.get("tta"))
    return tta, int(metadata.get("tta_translate") or 0) if tta else 0


class ServedNet(nn.Module):
    """uint8 N x 32 x 32 x 3 -> (logits, features): the input conversion and the TTA, as the graph runs them."""

    def __init__(self, model: nn.Module, tta: bool, translate: int = 0) -> None:
        super().__init__()
        self.model, self.tta, self.translate = model, tta, translate

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).float() / 255
        # the views evaluation averages (engine.tta_views): the served model scores as evaluated
        logits, features = tta_average(self.model.forward_features, x, self.tta, self.translate)
        return logits, features


def _served_net(model: nn.Module, tta: bool, translate: int = 0) -> ServedNet:
    """A float32 CPU copy in eval mode."""
    cpu_model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    return ServedNet(cpu_model, tta, translate).eval()


def export_network(model: nn.Module, tta: bool, translate: int = 0):
    """The network part of the served graph (``image -> net_logits, features``) as an ``onnx.ModelProto``.

    The TorchScript exporter traces this static graph in about 0.1 s; the ``torch.export``-based
    one takes 3-4 s on 2 CPU cores, on the wall time of every tracked run and trial. The newer
    exporter is used when the older is gone (PyTorch deprecates it). Either way the served graph
    is checked against PyTorch (``served_parity``) before it is logged.
    """
    net = _served_net(model, tta, translate)
    example = torch.randint(0, 256, (2, *schema.IMAGE_SHAPE), dtype=torch.uint8)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _export_torchscript(net, example)
        except Exception:  # removed or failing in this PyTorch: the torch.export path
            return _export_dynamo(net, example)


def _export_torchscript(net: nn.Module, example: torch.Tensor):
    buffer = io.BytesIO()
    outputs = [NET_LOGITS, FEATURES]
    torch.onnx.export(
        net,
        (example,),
        buffer,
        dynamo=False,
        input_names=[schema.INPUT],
        output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in (schema.INPUT, *outputs)},
        opset_version=OPSET,
    )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(net: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        net,
        (example,),
        dynamo=True,
        verbose=False,
        input_names=[schema.INPUT],
        output_names=[NET_LOGITS, FEATURES],
        dynamic_shapes={"image": {0: batch}},
        opset_version=OPSET,
    )
    return program.model_proto


def export_served(model: nn.Module, metadata: dict[str, Any], constants: Constants):
    """The served graph (``cifar.contract.schema``): the network exported from PyTorch, then the fitted head."""
    return attach_head(export_network(model, *tta_of(metadata)), metadata["classes"], constants, metadata)


def feature_layout(model: nn.Module, dim: int) -> dict[str, Any]:
    """What the graph's ``features`` hold: each stage's mean activation, then the penultimate vector (last)."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return {"dim": int(dim), "penultimate": head.in_features, "layout": "stage means, then the penultimate vector"}


def torch_network(
    model: nn.Module,
    device: torch.device,
    *,
    tta: bool,
    tta_translate: int = 0,
    batch_size: int = 1000,
    channels_last: bool = False,
) -> NetOutputs:
    """The model as the graph's network part, on ``device`` in fp32: uint8 images -> (logits, features)."""

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = evaluate(
            model,
            images,
            np.zeros(len(images), np.int64),
            device=device,
            batch_size=batch_size,
            tta=tta,
            tta_translate=tta_translate,
            amp=False,
            channels_last=channels_last,
            with_features=True,
        )
        return result.logits, result.features

    return outputs


def served_parity(model: nn.Module, proto, images: np.ndarray, tta: bool, translate: int = 0) -> float:
    """Largest |difference| between the served graph's logits (ONNX Runtime) and PyTorch's, on uint8 ``images``."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = _served_net(model, tta, translate)(torch.from_numpy(np.array(images, np.uint8)))[0].numpy()
    (actual,) = session.run([schema.LOGITS], {schema.INPUT: np.ascontiguousarray(images, np.uint8)})
    return float(np.abs(actual - expected).max())


@dataclass(frozen=True)
class Constants:
    """The fitted numbers the head is made of (``cifar.run.calibration`` fits them; the head applies them)."""

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


@script(default_opset=op)
def _head(net_logits, features, temperature, threshold, whitening, means_t, means_sq, inv_dim, classes):
    """The contract's outputs from the network's (logits, features) and the fitted constants."""
    probabilities = op.Softmax(net_logits / temperature, axis=1)
    label = op.Gather(classes, op.ArgMax(net_logits, axis=1, keepdims=0), axis=0)
    logits = op.Identity(net_logits)
    # Mahalanobis distance to the nearest class on L2-normalised features (tied covariance),
    # |z - m|^2 expanded so that one MatMul serves every class
    axis = op.Constant(value_ints=[1])
    unit = features / op.Max(op.ReduceL2(features, axis, keepdims=1), op.Constant(value_float=1e-12))
    z = op.MatMul(unit, op.Cast(whitening, to=1))  # whitening is stored as float16
    distances = op.ReduceSum(z * z, axis, keepdims=1) - op.MatMul(z, means_t) * 2.0 + means_sq
    ood_score = op.ReduceMin(distances, axis, keepdims=0) * inv_dim
    in_distribution = op.LessOrEqual(ood_score, threshold)
    return label, probabilities, in_distribution, ood_score, logits


def head_model(classes: Sequence[str], constants: Constants):
    """The head alone (net_logits, features -> the contract's outputs), its fitted numbers as initializers."""
    proto = _head.to_model_proto()
    graph, outside = proto.graph, {NET_LOGITS, FEATURES, *schema.OUTPUTS}

    def named(name: str) -> str:  # the head's own tensors are prefixed; its inputs and outputs are not
        return name if name in outside or not name else HEAD + name

    for node in graph.node:
        node.name = f"{HEAD}{node.output[0]}/{node.op_type}"
        node.input[:] = [named(n) for n in node.input]
        node.output[:] = [named(n) for n in node.output]
    values = {**constants.tensors(), "classes": np.array(list(classes), dtype=object)}
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), HEAD + k) for k, v in values.items())
    dim, n = np.asarray(constants.whitening).shape[0], len(classes)
    del graph.input[:], graph.output[:]
    graph.input.extend([
        helper.make_tensor_value_info(NET_LOGITS, TensorProto.FLOAT, ["batch", n]),
        helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", dim]),
    ])  # fmt: skip
    graph.output.extend([
        helper.make_tensor_value_info(schema.LABEL, TensorProto.STRING, ["batch"]),
        helper.make_tensor_value_info(schema.PROBABILITIES, TensorProto.FLOAT, ["batch", n]),
        helper.make_tensor_value_info(schema.IN_DISTRIBUTION, TensorProto.BOOL, ["batch"]),
        helper.make_tensor_value_info(schema.OOD_SCORE, TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(schema.LOGITS, TensorProto.FLOAT, ["batch", n]),
    ])  # fmt: skip
    return proto


def attach_head(net, classes: Sequence[str], constants: Constants, metadata: dict[str, Any]):
    """The served model: ``net`` (image -> net_logits, features) with the head appended; returns a new proto."""
    names = {o.name for o in net.graph.output}
    if names != {NET_LOGITS, FEATURES}:
        raise ValueError(f"the network graph must output {NET_LOGITS} and {FEATURES}, not {sorted(names)}")
    head = head_model(classes, constants)
    head.ir_version = net.ir_version
    del head.opset_import[:]  # the network's opsets, once: merge_models would list the default domain twice
    proto = onnx.compose.merge_models(net, head, io_map=[(NET_LOGITS, NET_LOGITS), (FEATURES, FEATURES)])
    schema.set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    return proto


def set_constants(proto, constants: Constants, metadata: dict[str, Any]) -> None:
    """Rewrite a served graph's fitted constants (and its metadata record with them) in place."""
    fresh = {HEAD + k: v for k, v in constants.tensors().items()}
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
    schema.set_metadata(proto, metadata)


def constants_of(proto) -> Constants:
    """The fitted constants a served graph holds (what ``set_constants`` wrote)."""
    head = [i for i in proto.graph.initializer if i.name.startswith(HEAD)]
    t = {i.name.removeprefix(HEAD): numpy_helper.to_array(i) for i in head}
    means = np.ascontiguousarray(t["means_t"].T)
    return Constants(float(t["temperature"]), float(t["threshold"]), t["whitening"], means)


def head_nodes(proto) -> list[str]:
    """Names of the head's nodes (quantization leaves them in float)."""
    return [n.name for n in proto.graph.node if n.name.startswith(HEAD)]


def _session(proto):
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
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, None))
    session = _session(exposed)

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = [], []
        for i in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[i : i + batch_size], np.uint8)
            out = session.run([schema.LOGITS, FEATURES], {schema.INPUT: batch})
            logits.append(out[0])
            features.append(out[1])
        return np.concatenate(logits), np.concatenate(features)

    return outputs

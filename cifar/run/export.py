"""Trained model -> files that are data, not code: safetensors weights + JSON, and the served ONNX graph.

The served graph takes uint8 images as PIL and NumPy hold them (N x 32 x 32 x 3) and answers with
a label, calibrated probabilities and "none of these" (``cifar.serve.contract``). This module exports
its network part from PyTorch, ``image -> (net_logits, features)``, and attaches the head.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from cifar.engine.steps import tta_average
from cifar.serve import contract


def model_metadata(model_name: str, width: float, classes: Sequence[str], mean, std, **extra: Any) -> dict[str, Any]:
    return {
        "model": model_name,
        "width": width,
        "classes": list(classes),
        "contract": contract.describe(classes),
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
    from safetensors.torch import load_file

    from cifar.models import create_model

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
    example = torch.randint(0, 256, (2, *contract.IMAGE_SHAPE), dtype=torch.uint8)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _export_torchscript(net, example)
        except Exception:  # removed or failing in this PyTorch: the torch.export path
            return _export_dynamo(net, example)


def _export_torchscript(net: nn.Module, example: torch.Tensor):
    import onnx

    buffer = io.BytesIO()
    outputs = [contract.NET_LOGITS, contract.FEATURES]
    torch.onnx.export(
        net,
        (example,),
        buffer,
        dynamo=False,
        input_names=[contract.INPUT],
        output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in (contract.INPUT, *outputs)},
        opset_version=contract.OPSET,
    )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(net: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        net,
        (example,),
        dynamo=True,
        verbose=False,
        input_names=[contract.INPUT],
        output_names=[contract.NET_LOGITS, contract.FEATURES],
        dynamic_shapes={"image": {0: batch}},
        opset_version=contract.OPSET,
    )
    return program.model_proto


def export_served(model: nn.Module, metadata: dict[str, Any], constants: contract.Constants):
    """The served graph (``cifar.serve.contract``): the network exported from PyTorch, then the fitted head."""
    return contract.attach_head(export_network(model, *tta_of(metadata)), metadata["classes"], constants, metadata)


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
) -> contract.NetOutputs:
    """The model as the graph's network part, on ``device`` in fp32: uint8 images -> (logits, features)."""
    from cifar.engine import evaluate

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
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = _served_net(model, tta, translate)(torch.from_numpy(np.array(images, np.uint8)))[0].numpy()
    (actual,) = session.run([contract.LOGITS], {contract.INPUT: np.ascontiguousarray(images, np.uint8)})
    return float(np.abs(actual - expected).max())

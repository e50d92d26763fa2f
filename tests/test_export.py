"""cifar.export: the ONNX file every run logs matches PyTorch, whichever exporter made it."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cifar import export
from cifar.data import load_cache
from cifar.models import create_model


@pytest.fixture(scope="module")
def images01(prepared_dir) -> np.ndarray:
    """Real fixture test images as the graph takes them: N x 3 x 32 x 32 float32 in [0, 1]."""
    images = np.asarray(load_cache(prepared_dir).images["test"][:9])
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 255


def _model(name: str, prepared_dir) -> torch.nn.Module:
    data = load_cache(prepared_dir)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, width=1.0 if name == "resnet18" else 0.5, mean=data.mean, std=data.std)
    with torch.no_grad():  # batch-norm statistics away from their defaults, as after training
        model.train()(torch.from_numpy(np.array(data.images["train"][:64]).transpose(0, 3, 1, 2)).float() / 255)
    return model.eval()


@pytest.mark.parametrize("name", ["fastnet", "small_cnn", "resnet18"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_exported_graph_matches_pytorch_at_any_batch_size(name, exporter, prepared_dir, images01, monkeypatch):
    if exporter == "dynamo":  # what export_onnx falls back to when PyTorch drops the TorchScript exporter
        monkeypatch.setattr(export, "_export_torchscript", _removed)
    model = _model(name, prepared_dir)
    for tta in (False, True):
        meta = export.model_metadata(name, 0.5, tuple("abcdefghij"), (0.5,) * 3, (0.25,) * 3, tta=tta)
        proto = export.export_onnx(model, prepared_dir.parent / f"{name}-{exporter}-{tta}.onnx", meta)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        assert json.loads(session.get_modelmeta().custom_metadata_map["cifar"])["tta"] is tta
        reference = export.servable(model, meta)
        for batch in (images01[:1], images01):  # the batch axis is dynamic
            with torch.no_grad():
                expected = reference(torch.from_numpy(batch)).numpy()
            actual = session.run(None, {export.INPUT_NAME: batch})[0]
            assert actual.shape == (len(batch), 10)
            np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)
        assert export.onnx_parity(model, proto, images01, tta=tta) < 1e-4


def test_flip_tta_graph_scores_an_image_and_its_mirror_alike(prepared_dir, images01):
    model = _model("fastnet", prepared_dir)
    meta = export.model_metadata("fastnet", 0.5, tuple("abcdefghij"), (0.5,) * 3, (0.25,) * 3, tta=True)
    proto = export.export_onnx(model, prepared_dir.parent / "tta.onnx", meta)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    straight = session.run(None, {export.INPUT_NAME: images01})[0]
    mirrored = session.run(None, {export.INPUT_NAME: np.ascontiguousarray(images01[..., ::-1])})[0]
    np.testing.assert_allclose(straight, mirrored, atol=1e-4)


def _removed(*args, **kwargs):
    raise RuntimeError("the TorchScript-based exporter was removed")

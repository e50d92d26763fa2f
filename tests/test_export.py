"""cifar.run.export + cifar.contract.schema: the served graph matches PyTorch and its head computes what it claims."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cifar.contract import schema
from cifar.data import load_cache
from cifar.engine.models import create_model
from cifar.metrics import softmax
from cifar.run import export
from cifar.run.calibration import fit_density, fit_temperature


@pytest.fixture(scope="module")
def data(prepared_dir):
    return load_cache(prepared_dir)


def _model(name: str, data) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, width=1.0 if name == "resnet18" else 0.5, mean=data.mean, std=data.std)
    with torch.no_grad():  # batch-norm statistics away from their defaults, as after training
        model.train()(torch.from_numpy(np.array(data.images["train"][:64]).transpose(0, 3, 1, 2)).float() / 255)
    return model.eval()


def _constants(model, data, tta: bool, translate: int = 0) -> export.Constants:
    net = export.torch_network(model, torch.device("cpu"), tta=tta, tta_translate=translate)
    logits, features = net(np.asarray(data.images["train"]))
    whitening, means = fit_density(features, data.labels["train"], 10)
    return export.Constants(fit_temperature(logits, data.labels["train"]), 1.5, whitening, means)


def _session(proto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["fastnet", "small_cnn", "resnet18"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_served_graph_matches_pytorch_at_any_batch_size(name, exporter, data, monkeypatch):
    if exporter == "dynamo":  # what export_served falls back to when PyTorch drops the TorchScript exporter
        monkeypatch.setattr(export, "_export_torchscript", _removed)
    model = _model(name, data)
    images = np.asarray(data.images["test"][:9])
    for tta, translate in ((False, 0), (True, 0), (True, 1)):  # none, mirror, mirror + translate
        meta = export.model_metadata(name, 0.5, data.classes, data.mean, data.std, tta=tta, tta_translate=translate)
        proto = export.export_served(model, meta, _constants(model, data, tta, translate))
        assert schema.is_served(proto) and export.tta_of(schema.metadata_of(proto)) == (tta, translate)
        session = _session(proto)
        reference = export.torch_network(model, torch.device("cpu"), tta=tta, tta_translate=translate)
        for batch in (images[:1], images):  # the batch axis is dynamic
            expected_logits, _ = reference(batch)
            logits, labels = session.run([schema.LOGITS, schema.LABEL], {schema.INPUT: batch})
            assert logits.shape == (len(batch), 10)
            np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=1e-4)
            assert list(labels) == [data.classes[i] for i in expected_logits.argmax(1)]
        assert export.served_parity(model, proto, images, tta, translate) < 1e-4


def test_the_head_computes_calibration_and_the_mahalanobis_score(data):
    """An independent NumPy reading of the head's definition, against what ONNX Runtime computes."""
    model = _model("fastnet", data)
    constants = _constants(model, data, tta=True)
    meta = export.model_metadata("fastnet", 0.5, data.classes, data.mean, data.std, tta=True)
    proto = export.export_served(model, meta, constants)
    images = np.asarray(data.images["test"])
    out = dict(zip(schema.OUTPUTS, _session(proto).run(list(schema.OUTPUTS), {schema.INPUT: images})))
    logits, features = export.torch_network(model, torch.device("cpu"), tta=True)(images)
    np.testing.assert_allclose(out["probabilities"], softmax(logits / constants.temperature), atol=1e-5)
    assert not np.allclose(out["probabilities"], softmax(logits), atol=1e-3)  # the temperature acts
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    z = unit @ constants.whitening.astype(np.float64)
    distances = ((z[:, None, :] - constants.class_means[None]) ** 2).sum(-1).min(1) / z.shape[1]
    np.testing.assert_allclose(out["ood_score"], distances, rtol=2e-3, atol=1e-4)
    np.testing.assert_array_equal(out["in_distribution"], out["ood_score"] <= np.float32(constants.threshold))
    assert out["label"].dtype == object and out["in_distribution"].dtype == bool


def test_refitting_rewrites_the_constants_in_place(data):
    model = _model("small_cnn", data)
    constants = _constants(model, data, tta=False)
    meta = export.model_metadata("small_cnn", 0.5, data.classes, data.mean, data.std)
    proto = export.export_served(model, meta, constants)
    images = np.asarray(data.images["val"])
    before = _session(proto).run([schema.PROBABILITIES, schema.IN_DISTRIBUTION], {schema.INPUT: images})
    hotter = export.Constants(constants.temperature * 3, -1.0, constants.whitening, constants.class_means)
    export.set_constants(proto, hotter, {**meta, "trust": {"temperature": hotter.temperature}})
    onnx.checker.check_model(proto)
    after = _session(proto).run([schema.PROBABILITIES, schema.IN_DISTRIBUTION], {schema.INPUT: images})
    assert after[0].max(1).mean() < before[0].max(1).mean()  # a higher temperature: less confident
    assert before[1].any() and not after[1].any()  # a negative threshold: nothing is in distribution
    assert schema.metadata_of(proto)["trust"]["temperature"] == pytest.approx(hotter.temperature)
    with pytest.raises(ValueError, match="cannot become"):
        wider = np.eye(len(constants.whitening) + 1)
        export.set_constants(proto, export.Constants(1.0, 1.0, wider, np.zeros((10, len(wider)))), meta)


def test_flip_tta_graph_scores_an_image_and_its_mirror_alike(data):
    model = _model("fastnet", data)
    meta = export.model_metadata("fastnet", 0.5, data.classes, data.mean, data.std, tta=True)
    session = _session(export.export_served(model, meta, _constants(model, data, tta=True)))
    images = np.asarray(data.images["test"][:9])
    names = [schema.LOGITS, schema.OOD_SCORE]
    straight = session.run(names, {schema.INPUT: images})
    mirrored = session.run(names, {schema.INPUT: np.ascontiguousarray(images[:, :, ::-1])})
    np.testing.assert_allclose(straight[0], mirrored[0], atol=1e-4)
    np.testing.assert_allclose(straight[1], mirrored[1], rtol=1e-3)


def _removed(*args, **kwargs):
    raise RuntimeError("the TorchScript-based exporter was removed")

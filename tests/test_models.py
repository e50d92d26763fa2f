"""Model registry: every model maps 32x32 images to 10 logits; the whitening stem whitens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar.data import load_cache
from cifar.engine.models import available_models, create_model
from cifar.errors import CifarError
from cifar.run.export import ServedNet


@pytest.mark.parametrize("name", sorted(available_models()))
def test_forward_shape_and_backward(name):
    model = create_model(name)
    x = torch.rand(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    # forward_features: the same logits, and a feature vector ending in the penultimate (the head's input)
    model.eval()
    with torch.no_grad():
        same, features = model.forward_features(x)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        penultimate = features[:, -head.in_features :]
        scale = getattr(model.body, "head_scale", 1.0)
        assert torch.allclose(same, model(x), atol=1e-5)
        assert torch.allclose(head(penultimate) * scale, same, atol=1e-5)
        assert features.shape[0] == 4 and features.shape[1] > head.in_features


def test_required_models():
    assert {"fastnet", "resnet18", "small_cnn"} <= set(available_models())


def test_resnet18_is_adapted_to_32x32():
    body = create_model("resnet18").body
    assert body.conv1.kernel_size == (3, 3) and body.conv1.stride == (1, 1)
    assert isinstance(body.maxpool, torch.nn.Identity)


def test_width_scales_parameters():
    small = sum(p.numel() for p in create_model("fastnet", width=0.5).parameters())
    big = sum(p.numel() for p in create_model("fastnet", width=1.0).parameters())
    assert 3 < big / small < 5


def test_unknown_model_and_bad_width():
    with pytest.raises(CifarError, match="unknown model 'vit'. Available models: .*fastnet"):
        create_model("vit")
    with pytest.raises(CifarError, match="fixed width"):
        create_model("resnet18", width=0.5)


def test_whitening_stem_decorrelates_real_patches(prepared_dir):
    data = load_cache(prepared_dir)
    images = torch.from_numpy(np.asarray(data.images["train"])).permute(0, 3, 1, 2).float() / 255
    model = create_model("fastnet", mean=data.mean, std=data.std)
    model.init_from_data(images)
    with torch.no_grad():
        out = model.body.whiten(model.normalize(images))[:, :12]  # first half: +filters
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    off_diagonal = cov - torch.diag(torch.diag(cov))
    assert off_diagonal.abs().max() < 0.01  # decorrelated
    # Each output's variance is lambda / (lambda + eps) for the patch covariance's eigenvalues
    # (near 1, except near-zero-variance directions that eps damps), computed here independently.
    normalized = (np.asarray(data.images["train"], np.float64) / 255 - data.mean) / data.std
    patches = np.lib.stride_tricks.sliding_window_view(normalized, (2, 2), axis=(1, 2))  # N,31,31,C,2,2
    eigenvalues = np.linalg.eigvalsh(np.cov(patches.reshape(-1, 12).T))[::-1]
    expected = eigenvalues / (eigenvalues + 5e-4)
    assert np.allclose(np.sort(torch.diag(cov).numpy())[::-1], expected, atol=0.01)


def test_whitening_stem_on_grayscale_leaves_no_dead_channel(prepared_dir):
    # Grayscale copied to RGB (as Fashion-MNIST is prepared) spans 4 of the 12 patch dimensions.
    gray = np.asarray(load_cache(prepared_dir).images["train"], np.float32).mean(-1, keepdims=True).repeat(3, -1)
    images = torch.from_numpy(gray).permute(0, 3, 1, 2) / 255
    model = create_model("fastnet", mean=[float(images.mean())] * 3, std=[float(images.std())] * 3)
    model.init_from_data(images)
    with torch.no_grad():
        out = model.body.whiten(model.normalize(images))
    # A filter on an empty direction would output only its bias, which trains without bound.
    assert out.std(dim=(0, 2, 3)).min() > 0.5
    assert torch.linalg.matrix_rank(model.body.whiten.weight[:12].flatten(1)) == 4


def test_normalization_is_inside_the_model():
    model = create_model("small_cnn", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert "normalize.mean" in model.state_dict()


def test_flip_tta_is_flip_invariant():
    model = ServedNet(create_model("small_cnn").eval(), tta=True)
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    for a, b in zip(model(x), model(x.flip(2))):  # NHWC: the width axis is 2
        assert torch.allclose(a, b, atol=1e-5)

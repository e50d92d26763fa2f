"""Lookahead (no pull early, a known pull late, a state that resumes) and Muon (orthogonalized,
scale-free filter steps; torch's SGD for the rest)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cifar.config import load_experiment
from cifar.engine.optim import Lookahead, build_optimizer, orthogonalize


def moved(model: nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_lookahead_pull_grows_with_progress_and_finish_hands_over_the_slow_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 3))  # running statistics and the batch counter move too
    lookahead = Lookahead(model, decay=0.9, every=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    moved(model, 1.0)
    lookahead.step(1, 0.01)  # not a multiple of `every`: nothing happens
    assert torch.equal(model[0].weight, start["0.weight"] + 1)
    lookahead.step(2, 0.02)  # 2% into training: keep = 0.81 * 0.02**3, almost no pull
    assert torch.allclose(model[0].weight, start["0.weight"] + 1, atol=1e-5)

    synced = {k: v.clone() for k, v in model.state_dict().items()}
    moved(model, 1.0)
    lookahead.step(100, 1.0)  # the end: keep = 0.81, the model is pulled most of the way back
    assert torch.allclose(model[0].weight, synced["0.weight"] + (1 - 0.81), atol=1e-6)
    assert torch.equal(model[1].num_batches_tracked, start["1.num_batches_tracked"]), "counters are not averaged"

    saved = {k: v.clone() for k, v in lookahead.state_dict().items()}
    moved(model, 5.0)
    lookahead.finish()
    assert torch.equal(model[0].weight, saved["0.weight"])

    other = Lookahead(model)
    other.load_state_dict(saved)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in saved.items())


def test_orthogonalize_keeps_the_directions_and_flattens_the_spectrum():
    torch.manual_seed(0)
    for shape in ((64, 576), (576, 64)):  # wide, and tall (computed on the transpose)
        u, _, vh = torch.linalg.svd(torch.randn(*shape), full_matrices=False)
        spread = torch.logspace(0, -3, min(shape))  # singular values over three decades
        matrix = u @ torch.diag(spread) @ vh
        result = orthogonalize(matrix)
        values = torch.linalg.svdvals(result)
        assert values.max() < 1.6 and values[: len(values) // 2].min() > 0.5, "large and mid values pushed near 1"
        # Same singular vectors: in the basis of the input's, the result is (near) diagonal.
        core = u.T @ result @ vh.T
        assert (core - torch.diag(torch.diagonal(core))).abs().max() < 0.05


def conv_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4, bias=False)
    )


def muon_run(loss_scale: float, steps: int = 3, muon_lr: float = 0.1) -> tuple[nn.Module, nn.Module]:
    """The same net trained by Muon (filters) + SGD (rest), and a copy trained by torch.optim.SGD."""
    torch.manual_seed(0)
    model = conv_bn_net()
    reference = copy.deepcopy(model)
    cfg = load_experiment("smoke", ["optim.name=muon", f"optim.muon_lr={muon_lr}", "optim.weight_decay=0.01"])
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    o = cfg.optim
    sgd = torch.optim.SGD(
        [
            {"params": [reference[3].weight], "lr": o.lr, "weight_decay": o.weight_decay},
            {
                "params": list(reference[1].parameters()),
                "lr": o.lr * o.bias_lr_scale,
                "weight_decay": o.weight_decay / o.bias_lr_scale,
            },
        ],
        lr=o.lr,
        momentum=o.momentum,
        nesterov=True,
    )
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(steps):
        for net, opt in ((model, optimizer), (reference, sgd)):
            opt.zero_grad()
            (loss_scale * nn.functional.cross_entropy(net(x), y)).backward()
            opt.step()
    return model, reference


def test_muon_moves_filters_by_a_fixed_step_whatever_the_gradient_scale():
    small, _ = muon_run(loss_scale=1.0, steps=1)
    large, _ = muon_run(loss_scale=1000.0, steps=1)
    # Filters: renormalized to sqrt(out_channels), then an orthogonalized step of the same size.
    assert torch.allclose(small[0].weight, large[0].weight, atol=1e-4)
    assert small[0].weight.norm().item() == pytest.approx(math.sqrt(8), rel=0.2)
    # The head is plain SGD, so a 1000x gradient moves it much further.
    assert not torch.allclose(small[3].weight, large[3].weight, atol=1e-2)


def test_muon_gives_the_rest_exactly_torch_sgd():
    model, reference = muon_run(loss_scale=1.0, steps=4, muon_lr=0.0)  # filters only rescaled
    # A rescaled filter bank feeding BatchNorm computes the same function, so every other
    # parameter sees the gradients torch.optim.SGD sees and must follow it step for step.
    ratio = model[0].weight / reference[0].weight
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5)
    assert torch.allclose(model[3].weight, reference[3].weight, atol=1e-6)
    assert torch.allclose(model[1].bias, reference[1].bias, atol=1e-6)
    assert not torch.allclose(model[3].weight, conv_bn_net_at_start()[3].weight), "the head did learn"


def conv_bn_net_at_start() -> nn.Module:
    torch.manual_seed(0)
    return conv_bn_net()

"""Lookahead: no pull early, a known pull late, the slow weights at the end, and a state that resumes."""

from __future__ import annotations

import torch
from torch import nn

from cifar.optim import Lookahead


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
    lookahead.step(1, 100)  # not a multiple of `every`: nothing happens
    assert torch.equal(model[0].weight, start["0.weight"] + 1)
    lookahead.step(2, 100)  # 2% into training: keep = 0.81 * 0.02**3, almost no pull
    assert torch.allclose(model[0].weight, start["0.weight"] + 1, atol=1e-5)

    synced = {k: v.clone() for k, v in model.state_dict().items()}
    moved(model, 1.0)
    lookahead.step(100, 100)  # the end: keep = 0.81, the model is pulled most of the way back
    assert torch.allclose(model[0].weight, synced["0.weight"] + (1 - 0.81), atol=1e-6)
    assert torch.equal(model[1].num_batches_tracked, start["1.num_batches_tracked"]), "counters are not averaged"

    saved = {k: v.clone() for k, v in lookahead.state_dict().items()}
    moved(model, 5.0)
    lookahead.finish()
    assert torch.equal(model[0].weight, saved["0.weight"])

    other = Lookahead(model)
    other.load_state_dict(saved)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in saved.items())

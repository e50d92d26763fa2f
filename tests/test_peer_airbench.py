"""benchmarks/peer_airbench.py: the peer really learns on a CPU through its adaptation, and the
time-to-accuracy ratios read the measured curves the right way."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import peer_airbench as peer  # noqa: E402

from cifar.data import load_cache  # noqa: E402
from cifar.engine import native_bf16  # noqa: E402


def test_time_to_reach_interpolates_inside_the_curve_and_bounds_outside_it():
    curve = [peer.Point("a", 2, (0.90,), (200.0,)), peer.Point("a", 1, (0.80,), (100.0,))]
    assert peer.time_to_reach(curve, 0.85) == ("=", pytest.approx(150.0))
    assert peer.time_to_reach(curve, 0.70) == ("<=", 100.0)  # already there at its shortest run
    assert peer.time_to_reach(curve, 0.95) == (">", 200.0)  # not reached at its longest
    b = [peer.Point("b", 6, (0.85,), (75.0,))]
    assert peer.time_ratio(curve, b[0]) == pytest.approx(2.0)  # a needs 150 s for b's 85%, b took 75 s
    assert peer.time_ratio(b, curve[1]) == "<= 0.75"  # b's shortest run already beats a's 80% (100 s)
    assert peer.time_ratio(b, curve[0]) == "> 0.38"  # b never reaches a's 90% (200 s)


@pytest.mark.slow
def test_airbench_learns_on_a_cpu_through_the_adaptation(prepared_dir, tmp_path):
    """Its own training loop, unchanged, on the CPU in bf16 where native: accuracy well above chance.

    One autocast region around its whole loop caches the first bf16 copy of each weight, so
    without ``cache_enabled=False`` every step would see the initial weights and stay at chance.
    """
    import airbench

    data = load_cache(prepared_dir)  # 500 train+val images, 200 test
    root = peer.write_airbench_files(data, tmp_path)
    torch.manual_seed(0)
    with peer.cpu_adaptation(native_bf16(torch.device("cpu"))) as loader_cls, contextlib.chdir(root.parent):
        hyp = airbench.lib_airbench94.hyp
        loader = loader_cls("cifar10", train=True, batch_size=50, aug=hyp["aug"], altflip=True)
        test = loader_cls("cifar10", train=False, batch_size=200)
        model = airbench.train94(loader, epochs=8, verbose=False)
        accuracy = airbench.evaluate(model, test, tta_level=2)
    assert next(model.parameters()).device.type == "cpu"
    assert accuracy > 0.25, accuracy

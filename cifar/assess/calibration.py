"""Fit the served graph's constants: temperature, the "none of these" score and its threshold; measure them.

Every training run does this at its end, on the PyTorch model, before the graph is exported
(``serve_model``); ``refit`` does it again on a served graph. Pure: arrays and graphs in,
constants, metrics and figures out (``write_trust_report``); nothing here talks to MLflow.
``python -m cifar calibrate`` applies it to logged and registered models.

Fitting uses training and validation images only: the score's class means and covariance come
from training images, the temperature and the threshold from the validation split. The test
split and the out-of-distribution sets (noise, flat colours, Fashion-MNIST) only measure.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cifar.assess.trust import (
    ACCEPT_RATE,
    FASHION_MNIST_MISSING,
    OodSet,
    TrustProfile,
    acceptance_threshold,
    assess,
    fashion_mnist_images,
    fit_density,
    fit_temperature,
    generated_ood_images,
)
from cifar.serve import contract

# Training images the score is fitted on: all 45,000 gain little for a feature pass 4.5 times as long
# in every run and trial (benchmarks/ood_scores.py, RESULTS.md 2026-12-02).
FIT_IMAGES = 10_000


@functools.lru_cache(maxsize=1)
def ood_sets() -> tuple[tuple[OodSet, ...], dict[str, str]]:
    """(sets to measure on, {set: why it was not measured}): noise and flat images, and Fashion-MNIST.

    Built once per process: a tune worker calibrates every trial on the same images.
    """
    fashion = fashion_mnist_images()
    if fashion is None:
        return tuple(generated_ood_images()), {"fashion_mnist": FASHION_MNIST_MISSING}
    return (*generated_ood_images(), fashion), {}


@dataclass(frozen=True)
class Calibration:
    constants: contract.Constants
    profile: TrustProfile  # the record, with what the constants were measured to do
    outputs: dict[str, dict[str, np.ndarray]]  # the head's outputs on "test" and each OOD set

    @property
    def scores(self) -> dict[str, np.ndarray]:
        return {name: out[contract.OOD_SCORE] for name, out in self.outputs.items()}


def fit_sample(data, count: int = FIT_IMAGES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(data.images["train"]), np.asarray(data.labels["train"])
    if len(labels) > count:
        pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:count])
        images, labels = images[pick], labels[pick]
    return images, labels


def calibrate_network(net: contract.NetOutputs, data, test: tuple[np.ndarray, np.ndarray] | None = None) -> Calibration:
    """Fit the constants for a network (``net``: uint8 images -> logits, features); measure them through the head.

    ``test`` is the network's (logits, features) on the test split, when the caller has them.
    """
    classes = list(data.classes)
    train_images, train_labels = fit_sample(data)
    _, train_features = net(train_images)
    val_logits, val_features = net(np.asarray(data.images["val"]))
    test_logits, test_features = test if test is not None else net(np.asarray(data.images["test"]))
    whitening, means = fit_density(train_features, train_labels, len(classes))
    provisional = contract.Constants(fit_temperature(val_logits, data.labels["val"]), np.inf, whitening, means)
    val_scores = contract.apply_head(classes, provisional, val_logits, val_features)[contract.OOD_SCORE]
    constants = replace(provisional, threshold=acceptance_threshold(val_scores, ACCEPT_RATE))
    sets, not_measured = ood_sets()
    outputs = {"test": contract.apply_head(classes, constants, test_logits, test_features)}
    outputs.update({s.name: contract.apply_head(classes, constants, *net(s.images)) for s in sets})
    ood = {name: out for name, out in outputs.items() if name != "test"}
    metrics = assess(constants.temperature, constants.threshold, outputs["test"], data.labels["test"], ood)
    profile = TrustProfile(
        constants.temperature,
        constants.threshold,
        ACCEPT_RATE,
        metrics=metrics,
        not_measured=not_measured,
        fit_images=len(train_labels),
    )
    return Calibration(constants, profile, outputs)


@dataclass(frozen=True)
class ServedModel:
    proto: Any  # onnx.ModelProto: the served graph
    metadata: dict[str, Any]  # its metadata (classes, recipe facts, the trust record)
    calibration: Calibration
    parity: float  # largest |logit difference| between the graph and PyTorch on 64 validation images


def serve_model(
    model,
    data,
    metadata: dict[str, Any],
    device,
    *,
    batch_size: int = 1000,
    channels_last: bool = False,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> ServedModel:
    """A trained PyTorch model -> its served graph, constants fitted on this data (training, bundle build)."""
    from cifar.run.export import export_served, feature_layout, served_parity, torch_network, tta_of

    tta, translate = tta_of(metadata)
    net = torch_network(
        model, device, tta=tta, tta_translate=translate, batch_size=batch_size, channels_last=channels_last
    )
    calibration = calibrate_network(net, data, test)
    layout = feature_layout(model, len(calibration.constants.whitening))
    metadata = {**metadata, "features": layout, "trust": calibration.profile.to_dict()}
    proto = export_served(model, metadata, calibration.constants)
    parity = served_parity(model, proto, np.asarray(data.images["val"][:64]), tta, translate)
    return ServedModel(proto, metadata, calibration, parity)


def refit(proto, data) -> tuple[Any, Calibration]:
    """A served graph with its constants refitted on ``data`` through its own network (float or int8)."""
    calibration = calibrate_network(contract.network_of(proto), data)
    metadata = {**contract.metadata_of(proto), "trust": calibration.profile.to_dict()}
    contract.set_constants(proto, calibration.constants, metadata)
    return proto, calibration


def write_trust_report(calibration: Calibration, test_labels: np.ndarray, folder: Path) -> Path:
    """Reliability diagrams before/after the temperature, the OOD score histogram, metrics.csv, trust.json."""
    import pandas as pd

    from cifar.metrics import calibration_bins, softmax
    from cifar.plots import ood_score_histogram, reliability_diagram

    folder.mkdir(parents=True, exist_ok=True)
    profile, m = calibration.profile, calibration.profile.metrics
    test = calibration.outputs["test"]
    for name, probabilities, ece in (
        ("uncalibrated", softmax(np.asarray(test[contract.LOGITS], np.float64)), m["test_ece_uncalibrated"]),
        ("calibrated", test[contract.PROBABILITIES], m["test_ece_calibrated"]),
    ):
        bins = calibration_bins(np.asarray(probabilities, np.float64), test_labels)
        title = f"T = {profile.temperature:.2f}" if name == "calibrated" else "before temperature scaling"
        reliability_diagram(bins, ece, title).savefig(folder / f"reliability_{name}.png")
    ood_score_histogram(calibration.scores, profile.ood_threshold, profile.accept_rate).savefig(
        folder / "ood_scores.png"
    )
    pd.DataFrame([m]).T.rename(columns={0: "value"}).to_csv(folder / "metrics.csv", float_format="%.6f")
    (folder / "trust.json").write_text(json.dumps(profile.to_dict(), indent=2))
    return folder


def describe(profile: TrustProfile) -> str:
    """Temperature and calibration, each OOD set, then what was not measured: what a run prints."""
    p, m = profile, profile.metrics
    lines = [
        f"temperature {p.temperature:.3f}: test ECE {m['test_ece_uncalibrated']:.4f} -> "
        f"{m['test_ece_calibrated']:.4f}, NLL {m['test_nll_uncalibrated']:.4f} -> {m['test_nll_calibrated']:.4f}",
        f"'none of these' threshold accepts {m['ood_accept_rate_in']:.1%} of test images "
        f"({p.accept_rate:.0%} of validation); "
        + ", ".join(
            f"{k.removeprefix('ood_auroc_')} AUROC {v:.3f} (accepted {m['ood_false_accept_' + k[10:]]:.1%})"
            for k, v in m.items()
            if k.startswith("ood_auroc_")
        ),
    ]
    lines += [f"OOD set {name} {why}" for name, why in p.not_measured.items()]
    return "\n".join(lines)

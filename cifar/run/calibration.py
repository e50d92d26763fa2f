"""Fit the served graph's constants: temperature, the "none of these" score and its threshold; measure them.

The fitting itself is NumPy (scikit-learn for one covariance estimate); the graph applies what it
fits (``cifar.run.export``), so what is measured here is measured on the graph's own outputs.

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
import pandas as pd

from cifar.contract import schema
from cifar.contract.trust import ACCEPT_RATE, TrustProfile
from cifar.data import load_cache
from cifar.data.fashion_mnist import fashion_mnist_split
from cifar.errors import CifarError
from cifar.metrics import calibration_bins, expected_calibration_error, negative_log_likelihood, softmax
from cifar.run import export
from cifar.run.export import export_served, feature_layout, served_parity, torch_network, tta_of
from cifar.settings import settings

CIFAR10_MISSING = "not measured: CIFAR-10 is not prepared here (python -m cifar.data prepare; $CIFAR_DATA)"
FASHION_MNIST_MISSING = (
    "not measured: Fashion-MNIST is not installed (Debian package dataset-fashion-mnist: make system-deps; "
    "or point $CIFAR_FASHION_MNIST at a folder with t10k-images-idx3-ubyte.gz)"
)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def scaled_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``."""
    z = np.asarray(logits, np.float64) / temperature
    return float(np.mean(_logsumexp(z) - z[np.arange(len(labels)), np.asarray(labels)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises NLL on held-out data (Guo et al., 2017).

    NLL is convex in 1/T, so a golden-section search over log(1/T) finds the minimum.
    """
    lo, hi = np.log(1 / 20), np.log(20)  # T from 0.05 to 20
    ratio = (np.sqrt(5) - 1) / 2

    def loss(log_beta: float) -> float:
        return scaled_nll(logits, labels, float(np.exp(-log_beta)))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(np.exp(-(lo + hi) / 2))


def fit_density(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-conditional Gaussians with one shared covariance on L2-normalised features (Lee et al., 2018).

    The features are every stage's mean activation and the penultimate vector, so low-level
    statistics (noise, flat colour) count as well as the classes' shapes. The covariance is
    Ledoit-Wolf shrunk (more dimensions than images on small subsets). Returns (whitening D x D,
    class means in whitened coordinates C x D): a distance is ``||unit(f) @ whitening - mean_c||^2``,
    which the graph takes to the nearest class and divides by D.
    """
    from sklearn.covariance import ledoit_wolf  # lazy: scikit-learn takes ~1.4 s; calibrate --help skips it

    f = np.asarray(features, np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise ValueError(f"no training images of classes {missing} to fit the out-of-distribution score on")
    means = np.stack([f[labels == c].mean(0) for c in range(num_classes)])
    covariance, _ = ledoit_wolf(f - means[labels], assume_centered=True)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = (eigenvectors / np.sqrt(np.maximum(eigenvalues, eigenvalues.max() * 1e-9))).astype(np.float16)
    return whitening, means @ whitening.astype(np.float64)


def acceptance_threshold(ood_scores: np.ndarray, accept_rate: float = ACCEPT_RATE) -> float:
    """The ood_score at or below which ``accept_rate`` of these (in-distribution) images lie."""
    return float(np.quantile(np.asarray(ood_scores, np.float64), accept_rate))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling out-of-distribution images (higher ood_score) from in-distribution ones.

    Mann-Whitney U with ties halved: the chance that a random outlier scores above a random inlier.
    """
    scores = np.concatenate([out_scores, in_scores])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2 + 1, counts)  # average ranks over ties
    n_out, n_in = len(out_scores), len(in_scores)
    return float((ranks[:n_out].sum() - n_out * (n_out + 1) / 2) / (n_out * n_in))


@dataclass(frozen=True)
class OodSet:
    name: str
    images: np.ndarray  # N x 32 x 32 x 3 uint8


def generated_ood_images(count: int = 500, seed: int = 0) -> list[OodSet]:
    """Uniform noise and flat single-colour images: inputs no photo classifier should accept."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    flat = np.broadcast_to(rng.integers(0, 256, (count, 1, 1, 3), dtype=np.uint8), (count, 32, 32, 3)).copy()
    return [OodSet("noise", noise), OodSet("flat", flat)]


def fashion_mnist_images(count: int = 2000, folder: Path | None = None) -> OodSet | None:
    """Fashion-MNIST test images as 32x32 RGB (Debian's ``dataset-fashion-mnist``), or None when absent."""
    folder = Path(folder or settings().fashion_mnist)
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        return None
    return OodSet("fashion_mnist", fashion_mnist_split(folder, "t10k")[0][:count])  # as a prepared dataset sees them


def assess(
    temperature: float,
    threshold: float,
    test: dict[str, np.ndarray],
    test_labels: np.ndarray,
    ood: dict[str, dict[str, np.ndarray]],
) -> dict[str, float]:
    """Run metrics from the served graph's outputs: test calibration before/after, OOD detection per set.

    ``test`` and each ``ood[name]`` hold the graph's ``logits``, ``probabilities``, ``ood_score`` and
    ``in_distribution``. "Uncalibrated" is softmax of the raw logits, for the record.
    """
    labels = np.asarray(test_labels)
    raw, served = softmax(np.asarray(test["logits"], np.float64)), np.asarray(test["probabilities"], np.float64)
    metrics = {
        "temperature": temperature,
        "test_ece_uncalibrated": expected_calibration_error(raw, labels),
        "test_nll_uncalibrated": negative_log_likelihood(raw, labels),
        "test_ece_calibrated": expected_calibration_error(served, labels),
        "test_nll_calibrated": negative_log_likelihood(served, labels),
        "ood_threshold": threshold,
        "ood_accept_rate_in": float(np.mean(test["in_distribution"])),
    }
    for name, out in ood.items():
        metrics[f"ood_auroc_{name}"] = auroc(test["ood_score"], out["ood_score"])
        metrics[f"ood_false_accept_{name}"] = float(np.mean(out["in_distribution"]))
    return metrics


# Training images the score is fitted on: all 45,000 gain little for a feature pass 4.5 times as long
# in every run and trial (docs/results-log.md, 2026-12-02).
FIT_IMAGES = 10_000


@functools.lru_cache(maxsize=4)
def ood_sets(dataset: str = "cifar10") -> tuple[tuple[OodSet, ...], dict[str, str]]:
    """(sets to measure on, {set: why it was not measured}): noise and flat images, and the other real
    dataset: CIFAR-10's test images for a Fashion-MNIST model, Fashion-MNIST's for any other.

    Built once per process and dataset: a tune worker calibrates every trial on the same images.
    """
    if dataset == "fashion-mnist":
        real, missing = cifar10_images(), ("cifar10", CIFAR10_MISSING)
    else:
        real, missing = fashion_mnist_images(), ("fashion_mnist", FASHION_MNIST_MISSING)
    if real is None:
        return tuple(generated_ood_images()), dict([missing])
    return (*generated_ood_images(), real), {}


def cifar10_images(count: int = 2000) -> OodSet | None:
    """CIFAR-10 test images from the prepared CIFAR-10 cache ($CIFAR_DATA), or None when it is not prepared."""
    try:
        return OodSet("cifar10", np.asarray(load_cache(settings().data_dir).images["test"][:count]))
    except CifarError:
        return None


@dataclass(frozen=True)
class Calibration:
    constants: export.Constants
    profile: TrustProfile  # the record, with what the constants were measured to do
    outputs: dict[str, dict[str, np.ndarray]]  # the head's outputs on "test" and each OOD set

    @property
    def scores(self) -> dict[str, np.ndarray]:
        return {name: out[schema.OOD_SCORE] for name, out in self.outputs.items()}


def fit_sample(data, count: int = FIT_IMAGES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(data.images["train"]), np.asarray(data.labels["train"])
    if len(labels) > count:
        pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:count])
        images, labels = images[pick], labels[pick]
    return images, labels


def calibrate_network(net: export.NetOutputs, data, test: tuple[np.ndarray, np.ndarray] | None = None) -> Calibration:
    """Fit the constants for a network (``net``: uint8 images -> logits, features); measure them through the head.

    ``test`` is the network's (logits, features) on the test split, when the caller has them.
    """
    classes = list(data.classes)
    train_images, train_labels = fit_sample(data)
    _, train_features = net(train_images)
    val_logits, val_features = net(np.asarray(data.images["val"]))
    test_logits, test_features = test if test is not None else net(np.asarray(data.images["test"]))
    whitening, means = fit_density(train_features, train_labels, len(classes))
    provisional = export.Constants(fit_temperature(val_logits, data.labels["val"]), np.inf, whitening, means)
    val_scores = export.apply_head(classes, provisional, val_logits, val_features)[schema.OOD_SCORE]
    constants = replace(provisional, threshold=acceptance_threshold(val_scores, ACCEPT_RATE))
    sets, not_measured = ood_sets(data.dataset)
    outputs = {"test": export.apply_head(classes, constants, test_logits, test_features)}
    outputs.update({s.name: export.apply_head(classes, constants, *net(s.images)) for s in sets})
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
    calibration = calibrate_network(export.network_of(proto), data)
    metadata = {**schema.metadata_of(proto), "trust": calibration.profile.to_dict()}
    export.set_constants(proto, calibration.constants, metadata)
    return proto, calibration


def write_trust_report(calibration: Calibration, test_labels: np.ndarray, folder: Path) -> Path:
    """Reliability diagrams before/after the temperature, the OOD score histogram, metrics.csv, trust.json."""
    # lazy: seaborn takes ~1.5 s; `python -m cifar calibrate --help` imports this module and skips it
    from cifar.plots import ood_score_histogram, reliability_diagram

    folder.mkdir(parents=True, exist_ok=True)
    profile, m = calibration.profile, calibration.profile.metrics
    test = calibration.outputs["test"]
    for name, probabilities, ece in (
        ("uncalibrated", softmax(np.asarray(test[schema.LOGITS], np.float64)), m["test_ece_uncalibrated"]),
        ("calibrated", test[schema.PROBABILITIES], m["test_ece_calibrated"]),
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

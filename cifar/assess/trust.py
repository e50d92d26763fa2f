"""How far to trust a prediction: fitting the temperature and the "none of these" score, and measuring them.

Pure NumPy (scikit-learn for one covariance estimate), no torch. The numbers fitted here become
constants of the served ONNX graph (``cifar.serve.contract``); the graph, not this module, applies
them, so what is measured here is measured on the graph's own outputs.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar.settings import settings

# Share of validation images the OOD threshold accepts: a point above the 95% promised for unseen
# CIFAR-10 images, since a 5,000-image quantile and a 10,000-image test rate each move by tenths
# of a point (the test split's rate is measured with every run: ood_accept_rate_in).
ACCEPT_RATE = 0.96
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
    from sklearn.covariance import ledoit_wolf

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
class TrustProfile:
    """The record of a served model's calibration and "none of these" score: what was fitted and measured.

    The numbers that act are constants of the ONNX graph (``cifar.serve.contract``); this record travels
    beside them in the graph's metadata (written by the same call) for display and for the registry.
    """

    temperature: float = 1.0
    ood_threshold: float | None = None  # on ood_score; None: a model with no "none of these"
    accept_rate: float = ACCEPT_RATE
    score: str = "mahalanobis"  # nearest-class Mahalanobis distance on normalised multi-stage features
    metrics: dict[str, float] = field(default_factory=dict)  # what it was measured to do, for the record
    not_measured: dict[str, str] = field(default_factory=dict)  # OOD set -> why it was not measured
    fit_images: int = 0  # training images the score was fitted on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> TrustProfile:
        raw = raw or {}
        temperature = float(raw.get("temperature", 1.0))
        threshold = raw.get("ood_threshold")
        if not np.isfinite(temperature) or temperature <= 0 or (threshold is not None and not np.isfinite(threshold)):
            raise ValueError(f"temperature {temperature} / threshold {threshold} are not usable numbers")
        return cls(
            temperature,
            None if threshold is None else float(threshold),
            float(raw.get("accept_rate", ACCEPT_RATE)),
            str(raw.get("score", "mahalanobis")),
            {k: float(v) for k, v in (raw.get("metrics") or {}).items()},
            {str(k): str(v) for k, v in (raw.get("not_measured") or {}).items()},
            int(raw.get("fit_images", 0)),
        )


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
    path = folder / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        return None
    from PIL import Image

    with gzip.open(path, "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8)
    images = raw[16:].reshape(-1, 28, 28)[:count]
    # the same resize the prediction path applies to any non-32x32 image
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC)) for im in images])
    return OodSet("fashion_mnist", np.repeat(big[..., None], 3, axis=3))


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
    from cifar.metrics import expected_calibration_error, negative_log_likelihood, softmax

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


def occlusion_map(
    probabilities: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    target: int,
    patch: int = 8,
    stride: int = 2,
) -> np.ndarray:
    """Drop in the ``target`` probability when each pixel is covered by a grey patch (32 x 32, >= 0 = matters).

    ``probabilities`` maps an N x 32 x 32 x 3 uint8 batch to N x classes; all patch positions go in one
    batch, so any forward-only model (the ONNX one included) serves.
    """
    size = image.shape[0]
    starts = range(0, size - patch + 1, stride)
    positions = [(y, x) for y in starts for x in starts]
    batch = np.repeat(image[None], len(positions), axis=0)
    fill = np.uint8(image.mean())
    for i, (y, x) in enumerate(positions):
        batch[i, y : y + patch, x : x + patch] = fill
    base = probabilities(image[None])[0, target]
    drops = base - probabilities(batch)[:, target]
    heat, cover = np.zeros((size, size)), np.zeros((size, size))
    for drop, (y, x) in zip(drops, positions):
        heat[y : y + patch, x : x + patch] += drop
        cover[y : y + patch, x : x + patch] += 1
    return heat / np.maximum(cover, 1)


def ood_auroc_sets(metrics: dict[str, float]) -> dict[str, float]:
    """OOD set -> AUROC, for the sets these metrics measured."""
    return {k.removeprefix("ood_auroc_"): v for k, v in metrics.items() if k.startswith("ood_auroc_")}


def headline_ood_auroc(metrics: dict[str, float]) -> float | None:
    """The OOD AUROC a registry shows and gates on: the lowest over the sets measured (they are named beside it)."""
    values = ood_auroc_sets(metrics)
    return min(values.values()) if values else None


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, size: int = 160):
    """The 32x32 image enlarged, with where covering it lowered the prediction tinted red (a PIL image)."""
    from PIL import Image

    base = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST), np.float64)
    peak = heat.max()
    weight = np.clip(heat / peak, 0, 1) if peak > 0 else np.zeros_like(heat)
    weight = Image.fromarray((weight * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    weight = np.asarray(weight)
    alpha = 0.65 * (weight[..., None] / 255.0)
    red = np.array([255.0, 30.0, 30.0])
    grey = base.mean(axis=2, keepdims=True) * 0.6  # dim the rest so the highlighted region stands out
    return Image.fromarray(np.clip((1 - alpha) * grey.repeat(3, 2) + alpha * red, 0, 255).astype(np.uint8))

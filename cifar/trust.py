"""How far to trust a prediction: temperature scaling, an out-of-distribution score, occlusion maps.

Pure NumPy (no torch), so the slim app and ``cifar.predict`` use the very functions training
fitted them with. Logits in, numbers out.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ACCEPT_RATE = 0.95  # share of in-distribution validation images the OOD threshold accepts
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


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


def in_distribution_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy, ``T * logsumexp(logits / T)`` (Liu et al., 2020): low means "none of these"."""
    z = np.asarray(logits, np.float64)
    return temperature * _logsumexp(z / temperature)


def acceptance_threshold(scores: np.ndarray, accept_rate: float = ACCEPT_RATE) -> float:
    """The score above which ``accept_rate`` of these (in-distribution) images lie."""
    return float(np.quantile(np.asarray(scores, np.float64), 1 - accept_rate))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling in- from out-of-distribution (Mann-Whitney U, ties halved)."""
    scores = np.concatenate([in_scores, out_scores])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2 + 1
    ranks[order] = np.repeat(average, counts)
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


@dataclass(frozen=True)
class TrustProfile:
    """What a served model needs beyond its weights: its temperature and its "none of these" threshold.

    Stored with the model (the ONNX metadata's ``trust`` entry, or ``trust.json`` beside the ONNX
    file, written by ``python -m cifar.calibrate``) and applied by every prediction path.
    """

    temperature: float = 1.0
    ood_threshold: float | None = None  # on in_distribution_score; None: every image is accepted
    accept_rate: float = ACCEPT_RATE
    score: str = "energy"
    metrics: dict[str, float] = field(default_factory=dict)  # what it was measured to do, for the record

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
            str(raw.get("score", "energy")),
            {k: float(v) for k, v in (raw.get("metrics") or {}).items()},
        )

    def accepts(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(in-distribution score, accepted?) per row of logits."""
        scores = in_distribution_score(logits, self.temperature)
        accepted = scores >= self.ood_threshold if self.ood_threshold is not None else np.ones(len(scores), bool)
        return scores, accepted


def fit_profile(val_logits: np.ndarray, val_labels: np.ndarray, accept_rate: float = ACCEPT_RATE) -> TrustProfile:
    """Temperature and OOD threshold, both fitted on the validation split (never on test)."""
    temperature = fit_temperature(val_logits, val_labels)
    threshold = acceptance_threshold(in_distribution_score(val_logits, temperature), accept_rate)
    return TrustProfile(temperature, threshold, accept_rate)


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
    folder = Path(folder or os.environ.get("CIFAR_FASHION_MNIST", FASHION_MNIST))
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


def ood_report(in_scores: np.ndarray, ood_scores: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    """AUROC and false-accept rate at ``threshold`` for each OOD set, plus the in-distribution accept rate."""
    out = {"ood_accept_rate_in": float((in_scores >= threshold).mean())}
    for name, scores in ood_scores.items():
        out[f"ood_auroc_{name}"] = auroc(in_scores, scores)
        out[f"ood_false_accept_{name}"] = float((scores >= threshold).mean())
    return out


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


def assess(
    profile: TrustProfile,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    ood_logits: dict[str, np.ndarray],
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Test-split calibration before/after temperature scaling and OOD detection, as run metrics.

    Returns (metrics, scores): scores holds the in-distribution score of every image per set
    (``test`` and each OOD set), for the histogram.
    """
    from cifar.metrics import expected_calibration_error, softmax

    labels = np.asarray(test_labels)
    logits = np.asarray(test_logits, np.float64)
    raw, scaled = softmax(logits), softmax(logits / profile.temperature)
    metrics = {
        "temperature": profile.temperature,
        "test_ece_uncalibrated": expected_calibration_error(raw, labels),
        "test_nll_uncalibrated": scaled_nll(logits, labels),
        "test_ece_calibrated": expected_calibration_error(scaled, labels),
        "test_nll_calibrated": scaled_nll(logits, labels, profile.temperature),
    }
    scores = {"test": in_distribution_score(logits, profile.temperature)}
    scores.update({name: in_distribution_score(v, profile.temperature) for name, v in ood_logits.items()})
    if profile.ood_threshold is not None:
        metrics["ood_threshold"] = profile.ood_threshold
        outside = {k: v for k, v in scores.items() if k != "test"}
        metrics.update(ood_report(scores["test"], outside, profile.ood_threshold))
    return metrics, scores


def headline_ood_auroc(metrics: dict[str, float]) -> float | None:
    """The OOD AUROC a registry shows: on real images (Fashion-MNIST) when measured, else the mean."""
    if "ood_auroc_fashion_mnist" in metrics:
        return metrics["ood_auroc_fashion_mnist"]
    values = [v for k, v in metrics.items() if k.startswith("ood_auroc_")]
    return float(np.mean(values)) if values else None


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

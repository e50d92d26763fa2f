"""Where a prediction looks: the drop in its probability when each part of the image is covered."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image


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


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, size: int = 160):
    """The 32x32 image enlarged, with where covering it lowered the prediction tinted red (a PIL image)."""
    base = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST), np.float64)
    peak = heat.max()
    weight = np.clip(heat / peak, 0, 1) if peak > 0 else np.zeros_like(heat)
    weight = Image.fromarray((weight * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    weight = np.asarray(weight)
    alpha = 0.65 * (weight[..., None] / 255.0)
    red = np.array([255.0, 30.0, 30.0])
    grey = base.mean(axis=2, keepdims=True) * 0.6  # dim the rest so the highlighted region stands out
    return Image.fromarray(np.clip((1 - alpha) * grey.repeat(3, 2) + alpha * red, 0, 255).astype(np.uint8))

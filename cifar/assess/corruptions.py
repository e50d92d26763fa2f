"""Common image corruptions at five severities, CIFAR-10-C style, generated on the fly.

Each corruption maps an N x 32 x 32 x 3 uint8 batch to a corrupted one; severities follow the
spirit of Hendrycks & Dietterich (2019), with parameters chosen for 32 x 32 images. Pure NumPy
and PIL, so the robustness report needs no torch.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

SEVERITIES = (1, 2, 3, 4, 5)
Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1] * 255
    return _to_uint8(images + rng.normal(0, sigma, images.shape))


def _disk_kernel(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    kernel = (x**2 + y**2 <= radius**2 + 0.5).astype(np.float64)
    return kernel / kernel.sum()


def defocus_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    kernel = _disk_kernel((1.0, 1.5, 2.0, 2.5, 3.0)[severity - 1])
    r = kernel.shape[0] // 2
    padded = np.pad(images.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros(images.shape)
    h, w = images.shape[1:3]
    for dy in range(kernel.shape[0]):
        for dx in range(kernel.shape[1]):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * padded[:, dy : dy + h, dx : dx + w]
    return _to_uint8(out)


def jpeg_compression(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (80, 65, 58, 50, 40)[severity - 1]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8((images - mean) * c + mean)


def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(images + (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1] * 255)


def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side = round(32 * (0.95, 0.9, 0.85, 0.75, 0.6)[severity - 1])
    out = np.empty_like(images)
    for i, image in enumerate(images):
        small = Image.fromarray(image).resize((side, side), Image.Resampling.BOX)
        out[i] = np.asarray(small.resize(image.shape[1::-1], Image.Resampling.NEAREST))
    return out


def haze(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Fog-like: blend towards a bright, smooth random veil."""
    strength = (0.25, 0.35, 0.45, 0.55, 0.65)[severity - 1]
    n, h, w = images.shape[:3]
    coarse = rng.uniform(0.6, 1.0, (n, 4, 4))
    # bilinear upsampling of a 4 x 4 field gives a smooth veil
    grid = np.linspace(0, 3, h)
    i0 = np.clip(grid.astype(int), 0, 2)
    t = grid - i0
    rows = coarse[:, i0] * (1 - t)[None, :, None] + coarse[:, i0 + 1] * t[None, :, None]
    veil = rows[:, :, i0] * (1 - t)[None, None, :] + rows[:, :, i0 + 1] * t[None, None, :]
    return _to_uint8(images * (1 - strength) + strength * 255 * veil[..., None])


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "defocus_blur": defocus_blur,
    "jpeg_compression": jpeg_compression,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "haze": haze,
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (N x 32 x 32 x 3 uint8) under corruption ``name`` at ``severity`` 1..5, reproducibly."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1..5, not {severity}")
    return CORRUPTIONS[name](np.asarray(images, np.uint8), severity, np.random.default_rng(seed))

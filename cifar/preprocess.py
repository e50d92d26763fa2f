"""Image -> 32x32 RGB uint8: the one preprocessing path for data preparation, prediction and the app.

Imports neither torch nor MLflow (the slim app environment has neither).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar.errors import CifarError

IMAGE_SIZE = 32
# Refuse decompression bombs early: a 12-megapixel photo is fine, 200 MP is not.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def to_rgb32(image: Image.Image) -> np.ndarray:
    """Return the 32x32x3 uint8 array the model sees for a PIL image of any mode and size."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF/WebP: the first frame
    if image.size != (IMAGE_SIZE, IMAGE_SIZE) and image.format == "JPEG":
        # JPEG can decode at 1/2, 1/4, 1/8 scale: a large photo never decodes at full size.
        image.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes | Path | str, name: str | None = None) -> np.ndarray:
    """Decode bytes or a file into the model's 32x32x3 uint8 input; raise CifarError if unreadable."""
    label = name or (str(data) if not isinstance(data, bytes) else "image")
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        with Image.open(source) as image:
            return to_rgb32(image)
    except Image.DecompressionBombError as exc:
        raise CifarError(f"{label}: image is too large ({exc}); the limit is {MAX_PIXELS:,} pixels.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CifarError(f"{label}: not a readable image ({exc}).") from None

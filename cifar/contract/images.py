"""Image -> 32x32 RGB uint8: the one preprocessing path for data preparation, prediction and the app.

Imports neither torch nor MLflow (the slim app environment has neither).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar.errors import CifarError

IMAGE_SIZE = 32
# Limits on what a user may hand us (docs/training.md, "Limits"). A 12-megapixel photo is far inside them;
# a small file that claims hundreds of megapixels (a decompression bomb) is refused before any
# pixel is decoded. JPEGs decode at reduced size (draft), so only other formats pay full size.
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 50 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL warns above this and raises above twice this; we refuse above it


def to_rgb32(image: Image.Image) -> np.ndarray:
    """Return the 32x32x3 uint8 array the model sees for a PIL image of any mode and size."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF/WebP: the first frame
    if image.size != (IMAGE_SIZE, IMAGE_SIZE) and image.format == "JPEG":
        # JPEG can decode at 1/2, 1/4, 1/8 scale: a large photo never decodes at full size.
        image.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the (common) upright image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes | Path | str, name: str | None = None) -> np.ndarray:
    """Decode bytes or a file into the model's 32x32x3 uint8 input; raise CifarError if unreadable."""
    label = name or (str(data) if not isinstance(data, bytes) else "image")
    size = len(data) if isinstance(data, bytes) else _file_size(Path(data), label)
    if size > MAX_FILE_BYTES:
        raise CifarError(f"{label}: file is {size / 2**20:.0f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB.")
    if size == 0:
        raise CifarError(f"{label}: the file is empty.")
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        with warnings.catch_warnings():  # PIL warns of a bomb before the check below refuses it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
        with opened as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{width}x{height} = {width * height:,} pixels")
            return to_rgb32(image)
    except Image.DecompressionBombError as exc:
        raise CifarError(f"{label}: image is too large ({exc}); the limit is {MAX_PIXELS:,} pixels.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise CifarError(f"{label}: not a readable image ({type(exc).__name__}: {exc}).") from None


def _file_size(path: Path, label: str) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise CifarError(f"{label}: cannot read it ({exc.strerror or exc}).") from None

"""Property-based tests of the one image path (``cifar.contract.images.decode_image``), which
``cifar.serve.predict`` and the app use: whatever bytes arrive, the answer is a 32x32x3 uint8 array or
the project's own error with a message, in bounded time and memory."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifar.contract.images import MAX_FILE_BYTES, MAX_PIXELS, decode_image, to_rgb32
from cifar.errors import CifarError

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "I;16"]
# Formats PIL can write, with the modes each accepts (it converts the others first).
FORMATS = {
    "PNG": ("1", "L", "P", "RGB", "RGBA", "LA", "I;16"),  # Pillow 13 writes 32-bit "I" PNGs no more
    "JPEG": ("L", "RGB", "CMYK"),
    "GIF": ("L", "P"),
    "BMP": ("1", "L", "P", "RGB"),
    "TIFF": ("1", "L", "P", "RGB", "RGBA", "CMYK", "I", "F", "LAB", "I;16"),
    "WEBP": ("RGB", "RGBA"),
    "ICO": ("RGBA",),
    "PPM": ("1", "L", "RGB"),
    "TGA": ("L", "P", "RGB", "RGBA"),
}
# deadline=None: check() bounds each decode by CPU time; a wall-clock deadline would measure the load beside it
LIMITS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(data: bytes) -> str:
    """Decode; return 'ok' or 'error', asserting the contract either way."""
    start = time.thread_time()  # this thread's CPU time: work done, however loaded the machine
    try:
        array = decode_image(data)
    except CifarError as exc:
        assert str(exc).startswith("image: ") and len(str(exc)) < 2000
        outcome = "error"
    else:
        assert array.shape == (32, 32, 3) and array.dtype == np.uint8
        outcome = "ok"
    assert time.thread_time() - start < 5
    return outcome


def encode(mode: str, fmt: str, width: int, height: int, seed: int, frames: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode not in ("I;16", "I", "F") else rgb.convert("L").convert(mode)
    buf = io.BytesIO()
    if frames > 1:
        more = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)]
        image.save(buf, format=fmt, save_all=True, append_images=more * (frames - 1))
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


images = st.builds(
    lambda fmt, mode_index, w, h, seed: (fmt, FORMATS[fmt][mode_index % len(FORMATS[fmt])], w, h, seed),
    st.sampled_from(sorted(FORMATS)),
    st.integers(0, 20),
    st.integers(1, 80),
    st.integers(1, 80),
    st.integers(0, 2**16),
)


@LIMITS
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
@example(b"GIF89a")
def test_random_bytes_never_crash(data):
    check(data)


@LIMITS
@given(images)
def test_every_format_and_mode_decodes(spec):
    fmt, mode, width, height, seed = spec
    assert check(encode(mode, fmt, width, height, seed)) == "ok", spec


@LIMITS
@given(images, st.floats(0.0, 0.99))
def test_truncated_files_of_every_format_never_crash(spec, keep):
    fmt, mode, width, height, seed = spec
    data = encode(mode, fmt, width, height, seed)
    check(data[: int(len(data) * keep)])


@LIMITS
@given(st.sampled_from(MODES), st.integers(1, 3), st.integers(1, 3))
def test_tiny_images_in_every_pil_mode(mode, width, height):
    image = Image.new(mode, (width, height))
    for fmt in ("TIFF", "PNG", "WEBP"):
        buf = io.BytesIO()
        try:
            image.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):
            continue  # this format cannot store the mode
        assert check(buf.getvalue()) == "ok", (mode, fmt)
        return
    array = to_rgb32(image)  # no file format holds it (HSV, PA): the in-memory path still copes
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


@pytest.mark.parametrize("size", [(100_000, 1), (1, 100_000), (1, 1)])
def test_extreme_shapes(size):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    array = decode_image(buf.getvalue())
    assert array.shape == (32, 32, 3) and tuple(array[0, 0]) == (200, 30, 30)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_use_the_first_frame(fmt):
    data = encode("RGB" if fmt != "GIF" else "P", fmt, 40, 30, seed=1, frames=3)
    assert check(data) == "ok"


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height: a decompression bomb's shape."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


PEAK_GROWTH = """
import resource, sys
from cifar.contract.images import decode_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(data)
except Exception as exc:
    print(type(exc).__name__)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize("width, height", [(20_000, 20_000), (9_000, 9_000), (1_000_000, 100)])
def test_decompression_bombs_are_refused_before_decoding(width, height, tmp_path):
    start = time.thread_time()  # CPU time: never decoded, however loaded the machine
    data = png_claiming(width, height)
    assert len(data) < 200
    with pytest.raises(CifarError, match=f"too large.*limit is {MAX_PIXELS:,} pixels"):
        decode_image(data)
    assert time.thread_time() - start < 1
    # The peak memory of a fresh process (ru_maxrss is a lifetime peak: this one's is long past)
    (tmp_path / "bomb.png").write_bytes(data)
    out = subprocess.run([sys.executable, "-c", PEAK_GROWTH, str(tmp_path / "bomb.png")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    refused, grew = out.stdout.split()
    assert refused == "CifarError" and int(grew) < 50_000, out  # KB: nothing was decoded


def test_real_pixel_bomb_under_the_file_limit(tmp_path):
    """A 2 MB PNG of 10,000 x 10,000 flat pixels (100 MP) is refused, by pixels, not by file size."""
    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path, optimize=True)
    assert path.stat().st_size < MAX_FILE_BYTES
    with pytest.raises(CifarError, match="too large"):
        decode_image(path)


def test_wrong_extensions_and_oversized_files(tmp_path):
    png = encode("RGB", "PNG", 20, 20, seed=2)
    for name in ("photo.jpg", "photo.txt", "photo"):
        (tmp_path / name).write_bytes(png)
        assert decode_image(tmp_path / name).shape == (32, 32, 3)  # content decides, not the name
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(CifarError, match="the limit is 50 MB"):
        decode_image(big)
    with pytest.raises(CifarError, match="empty"):
        decode_image(b"")

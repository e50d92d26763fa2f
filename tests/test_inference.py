"""The one image -> prediction path (ONNX Runtime), cifar.serve.predict, the bundled model and its import."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image

from cifar.contract import schema
from cifar.contract.images import decode_image, to_rgb32
from cifar.errors import CifarError
from cifar.promote.bundle import BUNDLE_DIR
from cifar.serve.inference import Predictor


@pytest.fixture(scope="module")
def bundled() -> Predictor:
    return Predictor.from_uri(str(BUNDLE_DIR))


def test_inference_module_imports_no_torch():
    code = "import cifar.serve.inference, cifar.serve.predict, sys; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_bundled_model_is_accurate_on_real_test_images(bundled, mini_raw):
    predictions = bundled.predict_arrays(mini_raw.test_images)
    accuracy = np.mean([p.label == mini_raw.classes[y] for p, y in zip(predictions, mini_raw.test_labels)])
    assert accuracy > 0.85  # the card says 92.16% (int8) on the full test split
    card = (BUNDLE_DIR / "README.md").read_text()
    metrics = json.loads((BUNDLE_DIR / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.92 and f"{metrics['test_accuracy']:.2%}" in card
    assert sum(f.stat().st_size for f in BUNDLE_DIR.iterdir()) < 33_000_000


def test_prediction_fields(bundled, mini_raw):
    (p,) = bundled.predict_arrays(mini_raw.test_images[:1], top_k=5)
    assert p.label == p.top_k[0][0] and p.confidence == p.top_k[0][1]
    assert len(p.top_k) == 5 and all(a[1] >= b[1] for a, b in zip(p.top_k, p.top_k[1:]))
    assert p.probabilities.sum() == pytest.approx(1.0)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_every_format_and_mode_gives_the_same_answer(bundled, mini_raw):
    """A real test image, enlarged and saved in many formats and modes, keeps its prediction."""
    base = Image.fromarray(mini_raw.test_images[5]).resize((256, 256), Image.Resampling.BICUBIC)
    expected = bundled.predict_arrays([to_rgb32(base)])[0].label
    variants = {
        "jpeg": encode(base, "JPEG", quality=95),
        "png": encode(base, "PNG"),
        "webp": encode(base, "WEBP", quality=95),
        "bmp": encode(base, "BMP"),
        "gif": encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "rgba": encode(base.convert("RGBA"), "PNG"),
        "cmyk": encode(base.convert("CMYK"), "JPEG", quality=95),
        "palette": encode(base.quantize(256), "PNG"),
    }
    frames = [base, base.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    variants["animated-gif"] = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    for name, data in variants.items():
        array = decode_image(data, name)
        assert array.shape == (32, 32, 3) and array.dtype == np.uint8, name
        assert bundled.predict_arrays([array])[0].label == expected, name
    grey = decode_image(encode(base.convert("L"), "PNG"))
    assert (grey[..., 0] == grey[..., 1]).all()
    sixteen = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    assert decode_image(encode(sixteen, "PNG")).shape == (32, 32, 3)


def test_exif_rotation_is_honoured():
    top_red = np.zeros((64, 64, 3), np.uint8)
    top_red[:32, :, 0] = 255  # red on top, black below, as the camera sensor stored it
    image = Image.fromarray(top_red)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    shown = decode_image(encode(image, "JPEG", exif=exif, quality=95))
    # After the rotation the red half is on the right.
    assert shown[:, 20:, 0].mean() > 200 and shown[:, :12, 0].mean() < 50


def test_large_photo_decodes_at_reduced_size(monkeypatch):
    """A 12 MP JPEG is decoded at 1/8 scale (draft), never at full size: what is decoded, not how fast."""
    from PIL import JpegImagePlugin

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), np.uint8))
    data = encode(photo, "JPEG", quality=90)
    decoded = []
    full_load = JpegImagePlugin.JpegImageFile.load

    def load(self):
        decoded.append(self.size)
        return full_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    assert decode_image(data).shape == (32, 32, 3)
    assert decoded and max(decoded) == (500, 375)


def test_unreadable_input_is_a_clear_error():
    with pytest.raises(CifarError, match="not a readable image"):
        decode_image(b"definitely not an image", "x.jpg")


GOOD = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
# What a new user hands the Predictor instead of uint8 N x 32 x 32 x 3 (the requests
# tests/test_serving_rest.py sends the scoring server), and what the refusal says beyond the contract.
BAD_IMAGES = {
    "32x32 without channels": (GOOD[..., 0], r"shape \(2, 32, 32\)"),
    "64x64": (GOOD.repeat(2, 1).repeat(2, 2), r"shape \(2, 64, 64, 3\)"),
    "channels first": (GOOD.transpose(0, 3, 1, 2), r"shape \(2, 3, 32, 32\)"),
    "one image without the batch axis": (GOOD[0], r"add the batch axis"),
    "float in [0, 1]": (GOOD / 255, r"\[0, 1\] values times 255"),
    "float 0-255": (GOOD.astype(np.float32), r"float32"),
    "negative": (GOOD.astype(np.int16) - 128, r"pixel values -128 to 127"),
    "above 255": (GOOD.astype(np.int16) + 1, r"to 256"),
    "strings": (GOOD.astype(str), r"type <U3"),
    "NaN": (np.where(GOOD == GOOD.max(), np.nan, GOOD), r"float64"),
    "bool": (GOOD > 127, r"type bool"),
    "ragged": ([GOOD[0], GOOD[1, :16]], r"different shapes"),
    "empty batch": (GOOD[:0], r"no images"),
    "empty list": ([], r"no images"),
}


@pytest.mark.parametrize("case", BAD_IMAGES, ids=list(BAD_IMAGES))
def test_bad_images_are_one_clear_error_naming_the_contract(bundled, case):
    images, detail = BAD_IMAGES[case]
    rule = r"uint8 RGB images, N x 32 x 32 x 3, values 0-255"
    with pytest.raises(CifarError, match=f"{detail}.*{rule}|{rule}.*{detail}"):
        bundled.run(images)
    if len(images):  # predict_arrays answers no images with no predictions
        with pytest.raises(CifarError, match=rule):
            bundled.predict_arrays(images)


def test_integer_pixels_of_another_dtype_are_the_same_images(bundled):
    """Integers 0-255 convert exactly (as a JSON list does), so they are not refused."""
    expected = bundled.run(GOOD)[schema.PROBABILITIES]
    for images in (GOOD.astype(np.int64), GOOD.tolist(), list(GOOD)):
        np.testing.assert_array_equal(bundled.run(images)[schema.PROBABILITIES], expected)


@pytest.mark.parametrize("name", ["model.onnx", "model.pkl", "weights.bin", "model"])
def test_pickle_planted_as_a_model_is_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    planted = tmp_path / name
    planted.write_bytes(pickle.dumps(PlantsAFile(str(marker))))
    with pytest.raises(CifarError, match="is a Python pickle"):
        Predictor.from_uri(str(planted))
    result = run_cli(
        [
            "-m",
            "cifar.serve.predict",
            str(ROOT / "tests/fixtures/cifar10-mini/test/cat/0000.jpg"),
            "--model-uri",
            str(planted),
        ]
    )
    assert result.returncode == 2 and "is a Python pickle" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_truncated_model_file_is_refused(tmp_path):
    truncated = tmp_path / "model.onnx"
    truncated.write_bytes((BUNDLE_DIR / "model.onnx").read_bytes()[:100_000])
    with pytest.raises(CifarError, match="not a valid ONNX model"):
        Predictor.from_uri(str(truncated))


def test_predict_cli_json_and_per_file_errors(tmp_path, mini_dir):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    images = [mini_dir / "test" / "cat" / "0000.jpg", mini_dir / "test" / "ship" / "0003.jpg"]
    result = run_cli(
        [
            "-m",
            "cifar.serve.predict",
            *map(str, images),
            str(bad),
            "--model-uri",
            str(BUNDLE_DIR),
            "--json",
            "--top-k",
            "2",
        ]
    )
    assert result.returncode == 1  # one file failed; the others were classified
    records = json.loads(result.stdout)
    assert [r["path"] for r in records] == [*map(str, images), str(bad)]
    assert set(records[0]) == {"path", "label", "confidence", "in_distribution", "ood_score", "top_k", "model"}
    assert records[0]["label"] == "cat" and len(records[0]["top_k"]) == 2
    assert set(records[0]["top_k"][0]) == {"label", "probability"}
    assert "not a readable image" in records[2]["error"]


def test_predict_cli_folder(mini_dir):
    result = run_cli(["-m", "cifar.serve.predict", str(mini_dir / "test" / "frog"), "--model-uri", str(BUNDLE_DIR)])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 20 and sum(": frog (" in line for line in lines) >= 16


def test_predict_files_keeps_order_and_errors_across_chunks(bundled, tmp_path, mini_dir):
    # Chunks of 2 decode on a thread while the previous chunk is scored: results stay in input order.
    good = sorted((mini_dir / "test" / "ship").glob("*.jpg"))[:5]
    bad = [tmp_path / "empty.png", tmp_path / "missing.jpg", tmp_path / "text.jpg"]
    bad[0].write_bytes(b"")
    bad[2].write_text("not an image")
    paths = [good[0], bad[0], good[1], good[2], bad[1], bad[2], good[3], good[4]]
    results = bundled.predict_files(paths, batch_size=2)
    single = [bundled.predict_files([p])[0] for p in paths]
    assert len(results) == len(paths)
    for path, chunked, alone in zip(paths, results, single):
        if path in bad:
            assert isinstance(chunked, str) and chunked == alone and path.name in chunked
        else:
            assert chunked.label == alone.label and np.allclose(chunked.probabilities, alone.probabilities, atol=1e-6)
    assert sum(r.label == "ship" for r in results if not isinstance(r, str)) >= 4


@pytest.mark.integration
def test_import_bundled_then_load_production(tmp_path, mini_raw):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=tmp_path)
    assert first.returncode == 0 and "now production" in first.stdout, first.stderr[-2000:]
    again = run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=tmp_path)
    assert "version 1; production stays version 1" in again.stdout
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        predictor = Predictor.from_uri("models:/cifar10-classifier@production")
        labels = [p.label for p in predictor.predict_arrays(mini_raw.test_images[:40])]
        assert np.mean([label == mini_raw.classes[y] for label, y in zip(labels, mini_raw.test_labels[:40])]) > 0.8
        version = mlflow.MlflowClient().get_model_version_by_alias("cifar10-classifier", "production")
        assert version.tags["source"] == "bundled" and version.current_stage == "Production"
    finally:
        mlflow.set_tracking_uri(None)


def test_no_production_model_says_what_to_run(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = run_cli(
        ["-m", "cifar.serve.predict", str(ROOT / "tests/fixtures/cifar10-mini/test/cat/0000.jpg")],
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "python register.py" in result.stderr


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_one_predictor_shared_by_32_threads(bundled, mini_raw):
    from concurrent.futures import ThreadPoolExecutor

    images = mini_raw.test_images[:40]
    sequential = [bundled.predict_arrays([image])[0].probabilities for image in images]
    for i in range(100):  # warm: memory is measured from here
        bundled.predict_arrays([images[i % len(images)]])
    baseline = resident_mb()

    def worker(thread: int) -> list[tuple[int, np.ndarray]]:
        picks = [(thread * 7 + i) % len(images) for i in range(200)]
        return [(i, bundled.predict_arrays([images[i]])[0].probabilities) for i in picks]

    with ThreadPoolExecutor(32) as pool:
        results = [r for chunk in pool.map(worker, range(32)) for r in chunk]
    assert len(results) == 32 * 200
    assert all(np.array_equal(p, sequential[i]) for i, p in results), "a shared predictor changed an answer"
    assert resident_mb() - baseline < 50, f"resident memory grew {resident_mb() - baseline:.0f} MB"


@pytest.mark.integration
def test_pickle_planted_in_a_registered_model_is_refused_by_cli(tmp_path):
    """Someone with write access to the artifact store swaps the production model for a pickle."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    assert run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=tmp_path).returncode == 0
    onnx_files = [p for p in tmp_path.rglob("*.onnx") if "mlruns" in p.parts or "mlartifacts" in p.parts]
    assert onnx_files, "the registered model's ONNX file is in the local artifact store"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(PlantsAFile(str(marker)))
    for path in onnx_files:
        path.write_bytes(payload)
    image = ROOT / "tests/fixtures/cifar10-mini/test/cat/0000.jpg"
    result = run_cli(["-m", "cifar.serve.predict", str(image)], env=env, cwd=tmp_path)
    assert result.returncode == 2 and "is a Python pickle, not an ONNX model" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


class PlantsAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _edited_model(tmp_path, edit) -> str:
    """The bundled ONNX model with its graph or metadata changed by ``edit(proto, metadata)``."""
    import onnx

    proto = onnx.load(str(BUNDLE_DIR / "model.onnx"))
    entry = next(p for p in proto.metadata_props if p.key == "cifar")
    metadata = json.loads(entry.value)
    edit(proto, metadata)
    entry.value = json.dumps(metadata)
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    return str(path)


def _input_64(proto, metadata):
    del proto.graph.value_info[:]  # shapes inferred for 32 x 32 inputs when the model was quantized
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[1:3]:
        dim.dim_value = 64


def _five_classes(proto, metadata):
    metadata["classes"] = metadata["classes"][:5]


@pytest.mark.parametrize(
    "edit, message",
    [(_input_64, "not N x 32 x 32 x 3 uint8 images"), (_five_classes, "outputs 10 classes but its metadata names 5")],
    ids=["input-size", "class-count"],
)
def test_a_model_for_another_shape_is_refused_by_the_cli(tmp_path, edit, message):
    model = _edited_model(tmp_path, edit)
    image = ROOT / "tests/fixtures/cifar10-mini/test/cat/0000.jpg"
    result = run_cli(["-m", "cifar.serve.predict", str(image), "--model-uri", model])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_transparent_pixels_are_white_not_what_lies_beneath(bundled, mini_raw):
    """A photo on a fully transparent canvas whose hidden colour is vivid green: the model sees white there."""
    photo = mini_raw.test_images[60]  # a cat
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[..., 1] = 255  # green under alpha 0: invisible to anyone looking at the image
    rgba[32:64, 32:64, :3], rgba[32:64, 32:64, 3] = photo, 255
    seen = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (seen[:4, :4] == 255).all() and (seen[-4:, -4:] == 255).all()  # white corners, no green
    white = np.full((96, 96, 3), 255, np.uint8)
    white[32:64, 32:64] = photo
    expected = bundled.predict_arrays([to_rgb32(Image.fromarray(white))])[0]
    got = bundled.predict_arrays([seen])[0]
    assert got.label == expected.label and np.allclose(got.probabilities, expected.probabilities)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_an_animated_image_is_predicted_by_its_first_frame(bundled, mini_raw, fmt):
    cat, ship = mini_raw.test_images[60], mini_raw.test_images[160]
    assert [p.label for p in bundled.predict_arrays([cat, ship])] == ["cat", "ship"]
    for first, second, expected in ((cat, ship, "cat"), (ship, cat, "ship")):
        frames = [Image.fromarray(im).resize((64, 64), Image.Resampling.NEAREST) for im in (first, second)]
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        with Image.open(io.BytesIO(data)) as check:
            assert check.n_frames == 2
        assert bundled.predict_arrays([decode_image(data, f"animated.{fmt.lower()}")])[0].label == expected

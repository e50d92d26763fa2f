"""The Streamlit app through Streamlit's AppTest: real registry, real model, real images."""

from __future__ import annotations

import io
import json

import mlflow
import numpy as np
import onnx
import pytest
import streamlit as st
from conftest import ROOT, relabelled
from PIL import Image
from streamlit.testing.v1 import AppTest

from cifar.contract.gallery import read_samples, write_samples
from cifar.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_split
from cifar.data.sources import CIFAR10_CLASSES
from cifar.promote import registry
from cifar.promote.bundle import BUNDLE_DIR, import_bundled
from cifar.settings import load_settings, settings
from cifar.tracking import log_onnx_model

APP = str(ROOT / "streamlit_app" / "app.py")
SAMPLES = ROOT / "models" / "bundled" / "samples"
pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def served(tracking_env):
    """A store whose production model is the bundled one."""
    version, promoted = import_bundled()
    assert promoted
    return tracking_env


def mini_example() -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLES.glob("*.png"))[:2]])


def run_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def text_of(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [m.value for m in at.sidebar.markdown] + [w.value for w in at.warning]
    return "\n".join(parts + [e.value for e in at.error])


def jpeg_of(array: np.ndarray, size: int = 200, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).resize((size, size)).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_no_production_model_says_what_to_run(tracking_env):
    at = run_app()
    assert "no production version of 'cifar10-classifier'" in at.error[0].value
    assert at.code[0].value == "python register.py --import-bundled"


def test_sidebar_shows_the_served_model(served):
    at = run_app()
    sidebar = "\n".join(m.value for m in at.sidebar.markdown)
    assert "**cifar10-classifier** version **1**" in sidebar and "aliases: production" in sidebar
    bundle = json.loads((BUNDLE_DIR / "metrics.json").read_text())
    assert f"test accuracy: {bundle['test_accuracy']:.2%}" in sidebar and "source: bundled, int8" in sidebar
    # The model page: per-class table, confusion matrix and curves from the run, and the latency.
    table = at.dataframe[0].value
    assert list(table["class"]) == list(CIFAR10_CLASSES)
    assert table["accuracy (recall)"].between(0.8, 1.0).all()
    assert {s.value for s in at.subheader} >= {
        "Per-class accuracy on the test split",
        "Confusion matrix",
        "Training curves",
    }
    assert at.metric[-1].value.endswith(" ms")
    # How far to trust it: the bundled model's calibration and OOD figures (its graph's trust record)
    trust = {m.label: m.value for m in at.metric}
    assert float(trust["Calibration error (ECE)"]) < 0.05
    assert float(trust["Out-of-distribution AUROC"]) > 0.85
    assert 0.3 < float(trust["Temperature"]) < 1.0
    assert float(trust["Accuracy under corruptions"]) == pytest.approx(bundle["mean_corruption_accuracy"], abs=1e-3)


def test_noise_is_not_one_of_the_classes(served, mini_raw):
    at = run_app()
    noise = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    at.file_uploader[0].set_value(
        [("static.png", buf.getvalue(), "image/png"), ("cat.jpg", jpeg_of(mini_raw.test_images[60]), "image/jpeg")]
    )
    at.run()
    assert not at.exception, at.exception
    headings = [m.value for m in at.markdown if m.value.startswith("### ")]
    assert headings[0].startswith("### none of these?") and headings[1].startswith("### cat")
    assert any("does not look like any of the 10 classes" in w.value for w in at.warning)


def test_the_confidence_shown_is_the_calibrated_one(served, mini_raw):
    from cifar.contract.images import decode_image
    from cifar.metrics import softmax
    from cifar.serve.inference import Predictor

    upload = jpeg_of(mini_raw.test_images[60])
    at = run_app()
    at.file_uploader[0].set_value([("cat.jpg", upload, "image/jpeg")])
    at.run()
    (heading,) = [m.value for m in at.markdown if m.value.startswith("### ")]
    out = Predictor.from_uri(str(BUNDLE_DIR)).run(decode_image(upload)[None])
    calibrated, raw = out["probabilities"][0].max(), softmax(out["logits"].astype(np.float64))[0].max()
    assert heading == f"### cat\n{calibrated:.1%} confident" and f"{raw:.1%}" != f"{calibrated:.1%}"


def test_upload_real_images(served, mini_raw):
    at = run_app()
    cat, ship = mini_raw.test_images[60], mini_raw.test_images[160]  # classes 3 (cat) and 8 (ship)
    assert mini_raw.classes[mini_raw.test_labels[60]] == "cat" and mini_raw.classes[mini_raw.test_labels[160]] == "ship"
    at.file_uploader[0].set_value([("cat.jpg", jpeg_of(cat), "image/jpeg"), ("ship.png", jpeg_of(ship), "image/png")])
    at.run()
    assert not at.exception, at.exception
    headings = [m.value for m in at.markdown if m.value.startswith("### ")]
    assert len(headings) == 2 and "confident" in headings[0]
    assert headings[0].startswith("### cat") and headings[1].startswith("### ship")
    assert len(at.get("vega_lite_chart")) == 2  # one top-5 chart per image


def test_gallery_click(served):
    at = run_app()
    at.button(key="sample-truck_0").click()
    at.run()
    headings = [m.value for m in at.markdown if m.value.startswith("### ")]
    assert headings == [h for h in headings if "confident" in h] and len(headings) == 1
    assert headings[0].startswith("### truck")


def test_bad_uploads_get_a_friendly_message(served, mini_raw):
    at = run_app()
    good = jpeg_of(mini_raw.test_images[0])
    animated = io.BytesIO()
    frames = [Image.fromarray(mini_raw.test_images[i]).resize((64, 64)) for i in range(3)]
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    huge = io.BytesIO()
    Image.new("L", (20000, 20000)).save(huge, format="PNG")  # 400 MP: a decompression bomb
    files = [
        ("notes.jpg", b"this is not an image", "image/jpeg"),
        ("truncated.jpg", good[: len(good) // 3], "image/jpeg"),
        ("huge.png", huge.getvalue(), "image/png"),
        ("animated.gif", animated.getvalue(), "image/gif"),
        ("cmyk.jpg", jpeg_of(mini_raw.test_images[1], mode="CMYK"), "image/jpeg"),
    ]
    at.file_uploader[0].set_value(files)
    at.run()
    assert not at.exception, at.exception
    warnings = [w.value for w in at.warning]
    assert any("notes.jpg" in w and "not a readable image" in w for w in warnings)
    assert any("huge.png" in w and "too large" in w for w in warnings)
    headings = [m.value for m in at.markdown if m.value.startswith("### ")]
    assert len(headings) >= 2  # the animated GIF (first frame) and the CMYK JPEG are classified
    at.button(key="sample-cat_0").click()
    at.run()  # and the app keeps working
    assert not at.exception


def answer_to_sample(at: AppTest, key: str = "sample-cat_0") -> str:
    """The label the page gives a sample image (its heading, "none of these?" or not)."""
    at.button(key=key).click()
    at.run()
    (heading,) = [m.value for m in at.markdown if m.value.startswith("### ")]
    return heading.removeprefix("### none of these?\nbest guess ").removeprefix("### ").split("\n")[0].split(",")[0]


def test_switches_to_a_newly_promoted_version(served, prepared_dir, monkeypatch):
    """Version 2 is the same network with its label table rotated: after the switch the page answers with it."""
    monkeypatch.setenv("CIFAR_DATA", str(prepared_dir))  # register.py re-evaluates on this test split
    monkeypatch.setenv("CIFAR_MODEL_CHECK_SECONDS", "3600")  # no timed check while a loaded machine registers
    load_settings()
    at = run_app()
    assert "version **1**" in text_of(at)
    before = answer_to_sample(at)
    import yaml

    mlflow.set_experiment("newer")
    proto, meta = relabelled(
        onnx.load(str(BUNDLE_DIR / "model.onnx")), yaml.safe_load((BUNDLE_DIR / "MLmodel").read_text())["metadata"]
    )
    with mlflow.start_run():
        uri = log_onnx_model(proto, meta, mini_example())
        mlflow.log_metrics({"val/best_accuracy": 0.99, "test/accuracy": 0.9}, model_id=uri.removeprefix("models:/"))
        mlflow.set_tag("model_uri", uri)
        mlflow.log_artifacts(str(SAMPLES), "samples")  # its gallery (a run carries the dataset's samples)
    decision = registry.decide(registry.find_best_run(["newer"]), registry.MODEL_NAME, 0.0, False)
    assessment = registry.assess_model(uri, robustness_images=0)  # the bundled net is slow on 2 cores
    assert registry.register_and_promote(decision, registry.MODEL_NAME, assessment=assessment).version == "2"
    at.run()
    assert "version **1**" in text_of(at)  # kept until the timed check...
    at.sidebar.button[0].click()  # ...or until "Check for a new model"
    at.run()
    assert "version **2**" in text_of(at) and not at.exception
    classes = list(CIFAR10_CLASSES)
    assert answer_to_sample(at) == classes[(classes.index(before) + 1) % len(classes)]  # version 2's own answer


def test_unreachable_tracking_server_is_named(tmp_path, monkeypatch):
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        at = run_app()
    finally:
        mlflow.set_tracking_uri(None)
    assert uri in at.error[0].value and "unset MLFLOW_TRACKING_URI" in at.error[0].value


def test_a_production_model_with_wrong_metadata_is_named_not_served(tracking_env):
    """Metadata that disagrees with the graph (5 class names for 10 outputs): refused, with the reason."""
    import json

    proto = onnx.load(str(BUNDLE_DIR / "model.onnx"))
    entry = next(p for p in proto.metadata_props if p.key == "cifar")
    metadata = json.loads(entry.value)
    edited = {**metadata, "classes": metadata["classes"][:5]}
    entry.value = json.dumps(edited)
    mlflow.set_experiment("edited")
    with mlflow.start_run():
        uri = log_onnx_model(proto, edited, mini_example())
    version = mlflow.register_model(uri, registry.MODEL_NAME).version
    mlflow.MlflowClient().set_registered_model_alias(registry.MODEL_NAME, "production", version)
    at = run_app()
    assert "could not be loaded" in at.error[0].value
    assert "outputs 10 classes but its metadata names 5" in at.error[0].value


def test_gallery_files_keep_any_class_name(tmp_path):
    names = ["T-shirt/top", "Über blau", "über blau", "cat"]  # a slash; names alike once made ASCII
    labels = np.repeat(np.arange(4), 3)
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    samples = read_samples(write_samples(images, labels, names, tmp_path / "samples"))
    assert [label for label, _ in samples] == [n for n in names for _ in range(2)]  # two per class, in order
    assert len({path.name for _, path in samples}) == 8
    assert np.array_equal(np.asarray(Image.open(samples[2][1])), images[3])  # the class's first image
    many = read_samples(write_samples(images, np.arange(12) % 12, [f"c{i}" for i in range(12)], tmp_path / "m", 10))
    assert [label for label, _ in many] == [f"c{i}" for i in range(10)]  # past the limit: one each, 10 in all
    assert read_samples(tmp_path / "nothing") == []


def fashion_named_model(data_dir) -> str:
    """The bundled network registered as ``fashion-mnist-classifier``: Fashion-MNIST's class names, and its run
    carries real Fashion-MNIST test images as samples."""
    import yaml

    proto, meta = relabelled(
        onnx.load(str(BUNDLE_DIR / "model.onnx")),
        yaml.safe_load((BUNDLE_DIR / "MLmodel").read_text())["metadata"],
        classes=list(FASHION_MNIST_CLASSES),
    )
    images, labels = fashion_mnist_split(settings().fashion_mnist, "t10k")
    mlflow.set_experiment("fashion")
    with mlflow.start_run():
        uri = log_onnx_model(proto, meta, images[:2])
        mlflow.log_artifacts(str(write_samples(images[:200], labels[:200], meta["classes"], data_dir)), "samples")
    version = mlflow.register_model(uri, "fashion-mnist-classifier").version
    mlflow.MlflowClient().set_registered_model_alias("fashion-mnist-classifier", "production", version)
    return version


def test_a_selector_offers_each_model_in_production_and_each_brings_its_own_classes(served, tmp_path, monkeypatch):
    fashion_named_model(tmp_path / "samples")
    at = run_app()
    (selector,) = at.sidebar.selectbox
    assert selector.options == ["cifar10-classifier", "fashion-mnist-classifier"]
    assert selector.value == "cifar10-classifier"
    assert at.title[0].value == "CIFAR-10 classifier" and "airplane · automobile" in at.caption[0].value
    selector.set_value("fashion-mnist-classifier").run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Fashion-MNIST classifier"
    assert at.caption[0].value == " · ".join(FASHION_MNIST_CLASSES)
    assert "**fashion-mnist-classifier** version **1**" in text_of(at)
    gallery = [b.label for b in at.button if b.key and b.key.startswith("sample-")]
    assert sorted(gallery) == sorted(FASHION_MNIST_CLASSES * 2)  # its run's samples (two each), not CIFAR-10's
    answer = answer_to_sample(at, "sample-Sneaker_0")
    assert answer in FASHION_MNIST_CLASSES
    monkeypatch.setenv("CIFAR_MODEL_NAME", "fashion-mnist-classifier")  # chosen by the host: no selector
    load_settings()
    try:
        pinned = run_app()
    finally:
        monkeypatch.delenv("CIFAR_MODEL_NAME")
        load_settings()
    assert not pinned.sidebar.selectbox and pinned.title[0].value == "Fashion-MNIST classifier"


def test_streamlit_binds_this_machine_and_the_hosting_command_every_interface():
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"  # `streamlit run streamlit_app/app.py`: not the network
    assert "--server.address 0.0.0.0" in (ROOT / "Procfile").read_text()  # a host's router reaches the dyno

"""Classifier app: serves a registered model's production version (ONNX Runtime, no torch).

    streamlit run streamlit_app/app.py        (or: make app)

Reads ``$MLFLOW_TRACKING_URI`` (else the local mlflow.db), ``$MLFLOW_UI_URL`` (for run links),
``$CIFAR_MODEL_NAME`` (the registered model to serve; unset, a selector offers each model in
production, CIFAR-10's first) and ``$CIFAR_MODEL_CHECK_SECONDS`` (how often an open page asks which
version is production; 60). Title, classes and sample gallery come from the model and its run.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the cifar package lives beside the app
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from cifar.contract.images import decode_image  # noqa: E402
from cifar.contract.registered_model import MODEL_NAME, model_title  # noqa: E402
from cifar.errors import CifarError  # noqa: E402
from cifar.serve import serving  # noqa: E402
from cifar.settings import settings  # noqa: E402

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif"]
CHECK_SECONDS = settings().model_check_seconds  # read once per app process


def check_production(name: str) -> None:
    """Ask the registry which models are in production and the chosen one's version; the answers stay in the session."""
    try:
        st.session_state["models"] = [settings().model_name] if settings().model_name else serving.served_model_names()
    except CifarError:  # an unreachable store: production_model names it
        st.session_state["models"] = []
    try:
        st.session_state["production"] = (serving.production_model(name), None)
    except CifarError as exc:
        st.session_state["production"] = (None, str(exc))
    st.session_state["production_of"] = name
    st.session_state["checked_at"] = time.time()


def choose_model() -> str:
    """``$CIFAR_MODEL_NAME``; else a selector when several models are in production; else the one there is."""
    names = st.session_state["models"]
    if len(names) > 1:
        default = names.index(MODEL_NAME) if MODEL_NAME in names else 0
        return st.sidebar.selectbox("Model", names, index=default, key="model_name")
    return names[0] if names else MODEL_NAME


@st.fragment(run_every=CHECK_SECONDS)
def watch_production() -> None:
    """Every CHECK_SECONDS this fragment alone re-runs; when production moved, the whole page follows."""
    served = st.session_state.get("production", (None, None))[0]
    # A page run in between (any click) does not ask again: at most once a period, as the timer does
    if time.time() - st.session_state.get("checked_at", 0) >= 0.9 * CHECK_SECONDS:
        check_production(st.session_state["production_of"])
        now = st.session_state["production"][0]
        if (now and now.version) != (served and served.version):
            st.rerun()  # the new model, its sidebar and its report
    checked = time.strftime("%H:%M:%S", time.localtime(st.session_state["checked_at"]))
    st.caption(f"Checked for a new production model at {checked} (every {CHECK_SECONDS:g} s).")


@st.cache_resource(show_spinner="Loading the model...", max_entries=3)
def predictor_for(model_uri: str, tracking_uri: str) -> serving.Predictor:
    """One loaded model per registered version (the cache key), shared by all sessions."""
    return serving.Predictor.from_uri(model_uri)


@st.cache_data(show_spinner=False)
def report_for(run_id: str, tracking_uri: str) -> serving.RunReport:
    return serving.run_report(run_id)


@st.cache_data(show_spinner=False)
def samples_for(run_id: str, tracking_uri: str) -> list[tuple[str, Path, bytes]]:
    return serving.model_samples(run_id) if run_id else []


@st.cache_data(show_spinner=False)
def latency_for(model_uri: str, tracking_uri: str, image: bytes) -> float:
    return serving.time_one_prediction(predictor_for(model_uri, tracking_uri), image)


def preview(data: bytes) -> bytes | None:
    """A display-sized copy of an upload (large photos are never decoded at full size)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (512, 512))
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((320, 320))
            if max(image.size) < 160:  # tiny images (CIFAR's 32x32): enlarge, keeping pixels sharp
                factor = 160 // max(image.size)
                image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue()
    except Exception:  # the decode error itself is shown by show_prediction
        return None


def show_prediction(name: str, data: bytes, predictor: serving.Predictor) -> None:
    try:
        array = decode_image(data, name)
    except CifarError as exc:
        st.warning(f"Could not read {exc}. Try a JPEG, PNG, WebP, BMP or GIF photo.")
        return
    prediction = predictor.predict_arrays([array], top_k=5)[0]
    original, seen, looks, chart = st.columns([2, 1, 1, 3])
    shown = preview(data)
    if shown:
        original.image(shown, caption=name)
    seen.image(serving.thumbnail(array), caption="What the model sees (32×32)")
    looks.image(serving.explanation_png(predictor, array), caption="Where it looks (occlusion: red mattered)")
    if prediction.in_distribution:
        chart.markdown(f"### {prediction.label}\n{prediction.confidence:.1%} confident")
    else:
        chart.markdown(f"### none of these?\nbest guess {prediction.label}, {prediction.confidence:.1%} confident")
        chart.warning(
            f"This does not look like any of the {len(predictor.classes)} classes: its out-of-distribution score "
            f"({prediction.ood_score:.2f}) is above the threshold that accepts "
            f"{predictor.trust.accept_rate:.0%} of validation images."
        )
    top = pd.DataFrame(prediction.top_k, columns=["class", "probability"])
    chart.bar_chart(top, x="class", y="probability", horizontal=True, sort="-probability", height=220)


def sidebar(info: serving.ModelInfo) -> None:
    st.sidebar.header("Model")
    st.sidebar.markdown(
        f"**{info.name}** version **{info.version}**  \n"
        f"aliases: {', '.join(info.aliases) or '-'}  \n"
        f"validation accuracy: {_pct(info.val_accuracy)}  \n"
        f"test accuracy: {_pct(info.test_accuracy)}  \n"
        f"source: {info.source}, {info.precision}  \n"
        f"run: `{info.run_id or '-'}`"
    )
    link = info.run_link()
    if link:
        st.sidebar.markdown(f"[Open the run in MLflow]({link})")
    st.sidebar.caption(f"Tracking store: {info.tracking_uri}")


def _ood_sets(trust: dict[str, str]) -> str:
    sets = trust.get("ood_auroc_sets", "")
    return ", ".join(s.replace("_", " ") for s in sets.split(",")) if sets else "the sets measured"


def _pct(value: str) -> str:
    try:
        return f"{float(value):.2%}"
    except ValueError:
        return value


def predict_page(predictor: serving.Predictor, samples: list[tuple[str, Path, bytes]], title: str) -> None:
    uploads = st.file_uploader("Upload one or more images", type=UPLOAD_TYPES, accept_multiple_files=True)
    with st.expander("Take a photo with the camera"):
        photo = st.camera_input("Camera")
    if samples:
        st.markdown(f"**Or click a sample {title} test image:**")
        columns = st.columns(10)
        for i, (label, file, image) in enumerate(samples):
            columns[i % 10].image(image, width=48)
            if columns[i % 10].button(label, key=f"sample-{file.stem}", wrap=True):  # "Ankle boot" whole, not "Ankle …"
                st.session_state["sample"] = (file.name, image)
    else:
        st.caption("This model's run carries no sample images.")
    items = [(u.name, u.getvalue()) for u in uploads or []]
    if photo is not None:
        items.append(("camera photo", photo.getvalue()))
    if st.session_state.get("sample") and not items:
        items.append(st.session_state["sample"])
    for name, data in items:
        st.divider()
        show_prediction(name, data, predictor)


def model_page(info: serving.ModelInfo, samples: list[tuple[str, Path, bytes]]) -> None:
    report = report_for(info.run_id, info.tracking_uri) if info.run_id else serving.RunReport(None, None, None)
    st.subheader("Per-class accuracy on the test split")
    if report.per_class is not None:
        table = report.per_class.rename(columns={"recall": "accuracy (recall)"})
        st.dataframe(table, hide_index=True)
    else:
        st.info("This model's run has no per-class report.")
    if report.confusion_matrix_png:
        st.subheader("Confusion matrix")
        st.image(report.confusion_matrix_png)
    if report.training_curves_png:
        st.subheader("Training curves")
        st.image(report.training_curves_png)
    st.subheader("How far to trust it")
    trust = info.trust
    cells = st.columns(4)
    for cell, key, label, help_text in (
        (cells[0], "test_ece", "Calibration error (ECE)", "after temperature scaling, test split; lower is better"),
        (cells[1], "ood_auroc", "Out-of-distribution AUROC", "the lowest over " + _ood_sets(trust)),
        (cells[2], "mean_corruption_accuracy", "Accuracy under corruptions", "mean over 7 corruptions x 5 severities"),
        (cells[3], "temperature", "Temperature", "divides the logits before softmax; fitted on validation"),
    ):
        value = trust.get(key)
        cell.metric(label, f"{float(value):.3f}" if value else "not measured", help=help_text)
    if not trust:
        st.caption("Measure them with python -m cifar calibrate and python -m cifar robustness.")
    ms = latency_for(info.uri, info.tracking_uri, samples[0][2]) if samples else None
    shown = f"{ms:.1f} ms" if ms is not None else "not measured (no sample image)"
    st.metric("One prediction (decode, resize, predict; median of 20)", shown)


def main() -> None:
    st.set_page_config(page_title="Image classifier", layout="wide")
    clicked = st.sidebar.button("Check for a new model")
    if "models" not in st.session_state:
        check_production(settings().model_name or MODEL_NAME)
    name = choose_model()
    if st.session_state["production_of"] != name:
        st.session_state.pop("sample", None)  # another model's sample
    if clicked or st.session_state["production_of"] != name:
        check_production(name)
    title = model_title(name)
    st.set_page_config(page_title=f"{title} classifier")
    st.title(f"{title} classifier")
    info, error = st.session_state["production"]
    if info is not None:
        sidebar(info)
    with st.sidebar:  # also while there is no model: the page recovers when one is promoted
        watch_production()
    if error:
        st.error(error)
        if st.session_state["production_of"] == MODEL_NAME:
            st.code("python register.py --import-bundled", language="bash")
        return
    try:
        predictor = predictor_for(info.uri, info.tracking_uri)
    except CifarError as exc:
        st.error(f"The production model could not be loaded: {exc}")
        return
    shown = predictor.classes[:30] + [f"and {len(predictor.classes) - 30} more"] * (len(predictor.classes) > 30)
    st.caption(" · ".join(shown))
    samples = samples_for(info.run_id, info.tracking_uri)
    predict_tab, model_tab = st.tabs(["Predict", "About the model"])
    with predict_tab:
        predict_page(predictor, samples, title)
    with model_tab:
        model_page(info, samples)


main()

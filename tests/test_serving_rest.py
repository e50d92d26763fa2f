"""MLflow's own scoring server on the registry's production model answers what the app and the CLI answer."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
import requests
from conftest import ROOT, png_bytes, run_cli
from servers import PRODUCTION, answers, inputs, mlflow_models_serve, post

from cifar.contract.images import decode_image
from cifar.metrics import softmax
from cifar.serve.inference import Predictor

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def scoring_server(tmp_path_factory):
    """The bundled model made production, served as docs/serving.md says."""
    root = tmp_path_factory.mktemp("rest")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    imported = run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=root)
    assert imported.returncode == 0, imported.stderr[-2000:]
    with mlflow_models_serve(env, root, "server") as url:
        yield url, env, root


def test_the_scoring_server_answers_like_cifar_predict_and_the_predictor(scoring_server, tmp_path):
    url, env, root = scoring_server
    files = sorted((ROOT / "models" / "bundled" / "samples").glob("*.png"))  # real CIFAR-10 test images
    rng = np.random.default_rng(7)
    for i in range(3):  # and uniform noise, which no class should claim
        noise = tmp_path / f"noise_{i}.png"
        noise.write_bytes(png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
        files.append(noise)
    batch = np.stack([decode_image(f) for f in files])  # uint8 N x 32 x 32 x 3, decoded from the PNG files
    response = requests.post(f"{url}/invocations", json={"inputs": {"image": batch.tolist()}}, timeout=120)
    assert response.status_code == 200, response.text[:2000]
    rest = response.json()["predictions"]
    assert set(rest) == {"label", "probabilities", "in_distribution", "ood_score", "logits"}

    cli = run_cli(["-m", "cifar.serve.predict", *map(str, files), "--json", "--top-k", "1"], env=env, cwd=root)
    assert cli.returncode == 0, cli.stderr[-2000:]
    records = json.loads(cli.stdout)
    assert rest["label"] == [r["label"] for r in records]
    assert rest["in_distribution"] == [r["in_distribution"] for r in records]
    assert rest["in_distribution"][-3:] == [False, False, False]  # the noise
    assert sum(rest["in_distribution"][:-3]) >= len(files) - 3 - 2  # the photos (the threshold keeps 96%)
    photos = [f.name.split("_")[0] for f in files[:-3]]
    assert np.mean([a == b for a, b in zip(rest["label"], photos)]) >= 0.8

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        predictor = Predictor.from_uri(PRODUCTION)
    finally:
        mlflow.set_tracking_uri(None)
    probabilities, logits = np.array(rest["probabilities"]), np.array(rest["logits"])
    np.testing.assert_allclose(probabilities, predictor.probabilities(batch), atol=1e-6)
    np.testing.assert_allclose([r["confidence"] for r in records], probabilities.max(1), atol=1e-6)
    # calibrated: softmax of the logits over the fitted temperature, which is not 1
    temperature = predictor.trust.temperature
    np.testing.assert_allclose(probabilities, softmax(logits / temperature), atol=1e-5)
    assert abs(temperature - 1) > 0.1 and np.abs(probabilities - softmax(logits)).max() > 0.05


# The input contract is the model's signature (uint8, -1 x 32 x 32 x 3, from the graph: cifar.tracking.onnx_signature).
# MLflow builds the array with np.array(json, dtype=uint8) and then enforces the signature's shape; what it says
# is MLflow's own text (docs/serving.md, "Serving with MLflow"). Each bad request: the 400 and what its message names.
RNG = np.random.default_rng(11)
GOOD = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
SIGNATURE = "Tensor('uint8', (-1, 32, 32, 3))"


def shape_error(shape: str) -> str:
    return f"Shape of input {shape} does not match expected shape (-1, 32, 32, 3)"


BAD_REQUESTS = {
    "32x32 without channels": (inputs(GOOD[..., 0]), shape_error("(2, 32, 32)")),
    "64x64": (inputs(GOOD.repeat(2, 1).repeat(2, 2)), shape_error("(2, 64, 64, 3)")),
    "channels first 3x32x32": (inputs(GOOD.transpose(0, 3, 1, 2)), shape_error("(2, 3, 32, 32)")),
    "one image without the batch axis": (inputs(GOOD[0]), shape_error("(32, 32, 3)")),
    "empty batch": (inputs([]), shape_error("(0,)")),
    "negative": (inputs(np.full((1, 32, 32, 3), -1)), "Python integer -1 out of bounds for uint8"),
    "above 255": (inputs(np.full((1, 32, 32, 3), 256)), "Python integer 256 out of bounds for uint8"),
    "a base64 PNG string": (
        json.dumps({"inputs": {"image": [base64.b64encode(png_bytes(GOOD[0])).decode()]}}),
        "invalid literal for int() with base 10: 'iVBOR",
    ),
    "NaN": (inputs(np.full((1, 32, 32, 3), np.nan)), "cannot convert float NaN to integer"),
    "ragged": (json.dumps({"inputs": {"image": [GOOD[0].tolist(), GOOD[1, :16].tolist()]}}), "inhomogeneous shape"),
    "malformed JSON": (inputs(GOOD)[:-7], "Ensure that input is a valid JSON formatted string"),
    "wrong input name": (json.dumps({"inputs": {"img": GOOD.tolist()}}), "Model is missing inputs ['image']"),
    "no inputs key": (json.dumps({"image": GOOD.tolist()}), "exactly one of the input fields"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_a_bad_request_is_a_400_that_says_why_and_the_server_goes_on(scoring_server, case):
    url, _, _ = scoring_server
    body, says = BAD_REQUESTS[case]
    response = post(url, body)
    assert response.status_code == 400, (response.status_code, response.text[:500])
    error = response.json()
    assert error["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE")
    assert says in error["message"], error["message"][-1000:]
    if "Shape of input" in says or case == "wrong input name":  # the signature's check names the contract
        assert SIGNATURE in error["message"]
    assert len(answers(url, GOOD)["label"]) == 2  # and the next request is answered


def test_what_mlflow_casts_instead_of_refusing(scoring_server):
    """Floats, booleans and digit strings are not refused: MLflow casts each value with int() to uint8.

    So a float image in [0, 1] is answered as the black image it truncates to (docs/serving.md says so; the
    Predictor refuses it: tests/test_inference.py). Fails when MLflow starts refusing them: then the
    serving page (docs/serving.md) changes.
    """
    url, _, _ = scoring_server
    black = answers(url, np.zeros_like(GOOD))
    assert (GOOD == 255).any()  # so GOOD / 255 holds some 1.0
    assert answers(url, GOOD / 255) == answers(url, GOOD // 255) != black  # all but 1.0 -> 0: nearly black
    assert answers(url, GOOD + 0.7) == answers(url, GOOD)  # 12.7 -> 12
    assert answers(url, GOOD > 127) == answers(url, (GOOD > 127).astype(np.uint8))  # true -> 1
    assert answers(url, GOOD.astype(str)) == answers(url, GOOD)  # "95" -> 95


# The largest batch docs/serving.md states: 1,000 images (16 MB of JSON) per request. MLflow refuses no size:
# it parses the JSON twice and copies it, then runs the whole batch through ONNX Runtime at once, about
# 1.5 MB of server memory per image; a request still working after the timeout (60 s) is answered 504.
BATCH_LIMIT = 1000


def test_a_batch_at_the_stated_limit_is_answered(scoring_server):
    url, _, _ = scoring_server
    images = np.resize(GOOD, (BATCH_LIMIT, 32, 32, 3))  # the two images, repeated
    predictions = answers(url, images)  # a 200: answered inside the server's default timeout (past it: a 504)
    assert predictions["label"] == answers(url, GOOD)["label"] * (BATCH_LIMIT // 2)


def test_a_request_past_the_timeout_is_a_504_and_the_server_goes_on(scoring_server):
    """What a batch too large for the timeout gets; a server with a 1 s timeout stands in for 60 s."""
    _, env, root = scoring_server
    with mlflow_models_serve(env, root, "server-1s", "--timeout", "1") as url:
        response = post(url, inputs(np.resize(GOOD, (BATCH_LIMIT, 32, 32, 3))))
        assert response.status_code == 504 and response.text == "Request processing time exceeded limit"
        # the request goes on in a thread (MLflow cannot stop it), then the server answers again
        deadline = time.monotonic() + 120
        while (response := post(url, inputs(GOOD))).status_code != 200 and time.monotonic() < deadline:
            time.sleep(1)
        assert response.status_code == 200, response.text[:500]

"""MLflow's own scoring server on the registry's production model answers what the app and the CLI answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import ROOT, clean_env, free_port, png_bytes, run_cli

from cifar.metrics import softmax
from cifar.serve.inference import Predictor
from cifar.serve.preprocess import decode_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PRODUCTION = "models:/cifar10-classifier@production"


@pytest.fixture(scope="module")
def scoring_server(tmp_path_factory):
    """``mlflow models serve`` on 127.0.0.1 (a free port) for the bundled model made production."""
    root = tmp_path_factory.mktemp("rest")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    imported = run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=root)
    assert imported.returncode == 0, imported.stderr[-2000:]
    port, bin_dir = free_port(), Path(sys.executable).parent
    log = open(root / "server.log", "w")
    server = subprocess.Popen(  # MLflow starts uvicorn from PATH: the venv's bin first
        [str(bin_dir / "mlflow"), "models", "serve", "-m", PRODUCTION, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        env=clean_env({**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}),
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(1)
        else:
            pytest.fail(f"the scoring server did not answer /ping: {(root / 'server.log').read_text()[-3000:]}")
        yield url, env, root
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_the_scoring_server_answers_like_cifar_predict_and_the_predictor(scoring_server, tmp_path):
    url, env, root = scoring_server
    files = sorted((ROOT / "streamlit_app" / "samples").glob("*.png"))  # real CIFAR-10 test images
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

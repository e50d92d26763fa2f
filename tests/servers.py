"""The project's servers started as a user starts them, on free ports of 127.0.0.1, stopped after."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import PYTHON, ROOT, clean_env, free_port, stop_process_group, wait_until_serving

PRODUCTION = "models:/cifar10-classifier@production"


@contextlib.contextmanager
def streamlit_app(env: dict, tmp_path: Path):
    """``streamlit run streamlit_app/app.py`` on a free port of 127.0.0.1: yields its URL, stops it after."""
    port = free_port()
    # The server's output goes to a file: an unread pipe fills up (MLflow's download bars, warnings
    # from 20 sessions) and then blocks the app mid-write, which looked like a page that never loads.
    log_path = tmp_path / "streamlit.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [PYTHON, "-m", "streamlit", "run", str(ROOT / "streamlit_app" / "app.py"), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_until_serving(f"{url}/_stcore/health", server, 90):
                pytest.fail(f"streamlit did not start: {log_path.read_text()[-2000:]}")
            yield url
        finally:
            stop_process_group(server, timeout=20)
            print(f"streamlit log (last lines): {log_path.read_text()[-1500:]}")


@contextlib.contextmanager
def mlflow_models_serve(env: dict, root: Path, name: str, *options: str, model: str = PRODUCTION):
    """``mlflow models serve`` on 127.0.0.1 (a free port) for ``model`` (the production one); yields its URL."""
    port, bin_dir = free_port(), Path(sys.executable).parent
    log_path = root / f"{name}.log"
    log = open(log_path, "w")
    server = subprocess.Popen(  # MLflow starts uvicorn from PATH: the venv's bin first
        [str(bin_dir / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port), *options],
        env=clean_env({**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}),
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # stopped with its uvicorn child
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_serving(f"{url}/ping", server, 240):
            pytest.fail(f"the scoring server did not answer /ping: {log_path.read_text()[-3000:]}")
        yield url
    finally:
        stop_process_group(server)
        with contextlib.suppress(ProcessLookupError):  # uvicorn waits for a request MLflow cannot stop (a 504's)
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def inputs(images) -> str:
    return json.dumps({"inputs": {"image": np.asarray(images).tolist()}})


def post(url: str, body: str, timeout: float = 120) -> requests.Response:
    return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=timeout)


def answers(url: str, images: np.ndarray) -> dict:
    response = post(url, inputs(images))
    assert response.status_code == 200, response.text[:2000]
    return response.json()["predictions"]

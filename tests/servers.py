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
def server(args: list[str], port: int, health: str, log_path: Path, timeout: float, **popen):
    """Start ``args`` (listening on ``port``) in a process group of its own; yield its URL once ``health``
    answers, and stop the whole group after. Its output goes to ``log_path``: an unread pipe fills up
    (MLflow's download bars, warnings from 20 sessions) and then blocks the server mid-write."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        try:
            if not wait_until_serving(f"{url}{health}", process, timeout):
                pytest.fail(f"{log_path.stem} did not answer {health}: {log_path.read_text()[-3000:]}")
            yield url
        finally:
            stop_process_group(process, timeout=20)
            with contextlib.suppress(ProcessLookupError):  # a child the leader left behind (uvicorn after a 504)
                os.killpg(process.pid, signal.SIGKILL)
            print(f"{log_path.name} (last lines): {log_path.read_text()[-1500:]}")


def streamlit_app(env: dict, tmp_path: Path):
    """``streamlit run streamlit_app/app.py`` on a free port of 127.0.0.1: yields its URL, stops it after."""
    port = free_port()
    args = [PYTHON, "-m", "streamlit", "run", str(ROOT / "streamlit_app" / "app.py"), "--server.port", str(port)]
    args += ["--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    return server(args, port, "/_stcore/health", tmp_path / "streamlit.log", 90, env=env, cwd=ROOT)


def mlflow_models_serve(env: dict, root: Path, name: str, *options: str, model: str = PRODUCTION):
    """``mlflow models serve`` on 127.0.0.1 (a free port) for ``model`` (the production one); yields its URL."""
    port, bin_dir = free_port(), Path(sys.executable).parent
    args = [str(bin_dir / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local"]
    args += ["-h", "127.0.0.1", "-p", str(port), *options]
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"  # MLflow starts uvicorn from PATH: the venv's bin first
    return server(args, port, "/ping", root / f"{name}.log", 240, env=clean_env({**env, "PATH": path}), cwd=root)


def inputs(images) -> str:
    return json.dumps({"inputs": {"image": np.asarray(images).tolist()}})


def post(url: str, body: str, timeout: float = 120) -> requests.Response:
    return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=timeout)


def answers(url: str, images: np.ndarray) -> dict:
    response = post(url, inputs(images))
    assert response.status_code == 200, response.text[:2000]
    return response.json()["predictions"]

"""Shared fixtures: real CIFAR-10 images (tests/fixtures) in every source format, and temp stores."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "cifar10-mini"
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
PYTHON = sys.executable
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's (.ci/run installs it)
# Headless as root on a closed network: no sandbox, and no background connections to refuse.
# The browser tests' marks: skipped (and said so) only off CI when Chromium is missing; in CI a
# missing browser fails them, so a page nobody looked at never passes unseen.
BROWSER_TEST = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and not os.environ.get("CI"),
        reason="needs Debian's chromium (make system-deps installs it)",
    ),
]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected: count only the gpu tests that were asked for
def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where there is a CUDA device; elsewhere they skip, and the summary says so."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not cuda_available():
        skip = pytest.mark.skip(reason="gpu: no CUDA device (make test-gpu runs these on a machine with one)")
        for item in gpu:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A line on the gpu tests: a run without CUDA must not pass for one that tested the GPU paths.

    Read from the reports, not the collection: under xdist the controller collects nothing."""
    outcome: dict[str, str] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if "gpu" not in getattr(report, "keywords", {}) or not hasattr(report, "when"):
                continue
            if report.failed:
                outcome[report.nodeid] = "failed"
            elif report.skipped:
                outcome.setdefault(report.nodeid, "skipped")
            elif report.when == "call":
                outcome.setdefault(report.nodeid, "passed")
    if not outcome:
        return
    if not cuda_available():
        message = f"gpu: not run, no CUDA device ({len(outcome)} gpu tests skipped)"
        terminalreporter.write_sep("=", message, yellow=True, bold=True)
        return
    import torch

    counts = ", ".join(f"{sum(v == o for v in outcome.values())} {o}" for o in ("passed", "failed", "skipped"))
    failed = "failed" in outcome.values()
    message = f"gpu: {counts} of {len(outcome)} gpu tests on {torch.cuda.get_device_name(0)}"
    terminalreporter.write_sep("=", message, red=failed, green=not failed, bold=True)


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory):
    """Registry-model copies (cifar.serve.modelcache) go to a temp folder, never the user's ~/.cache."""
    os.environ["CIFAR_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(autouse=True)
def restore_environment():
    """MLflow 3's set_experiment exports MLFLOW_EXPERIMENT_ID to os.environ; keep tests apart.

    Each test reads the settings afresh (cifar.settings), as each command does at its entry.
    """
    import cifar.settings

    cifar.settings._loaded = None
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def clean_env(extra: dict | None = None) -> dict:
    """This process's environment for a child process, without MLflow's run/experiment variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    }
    return {**env, **(extra or {})}


@pytest.fixture(scope="session")
def mini_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def mini_raw(mini_dir):
    """The fixture decoded once: (train_images, train_labels, test_images, test_labels)."""
    from cifar.data.sources import read_imagefolder

    raw = read_imagefolder(mini_dir, workers=1)
    return raw


def write_canonical_batches(folder: Path, raw) -> Path:
    """Write CIFAR-10's canonical python batches (5 train + test + meta) from decoded arrays."""
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels.tolist(),
            b"data": data,
            b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))

    order = np.random.default_rng(0).permutation(len(raw.train_labels))
    for i, part in enumerate(np.array_split(order, 5), start=1):
        dump(f"data_batch_{i}", raw.train_images[part], raw.train_labels[part])
    dump("test_batch", raw.test_images, raw.test_labels)
    meta = {b"label_names": [c.encode() for c in raw.classes], b"num_cases_per_batch": 10000}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def make_tar(path: Path, root: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname=arcname)
    return path


def train_small_model(prepared_dir: Path, overrides=(), callback=None):
    """The smoke recipe (small_cnn) really trained on the prepared fixture, on CPU, deterministically."""
    import torch

    from cifar.config import load_experiment
    from cifar.data import load_cache
    from cifar.engine import Hooks, fit, seed_everything
    from cifar.engine.models import create_model

    data = load_cache(prepared_dir)
    cfg = load_experiment("smoke", ["train.epochs=6", "train.batch_size=50", "optim.lr=0.05", *overrides])
    seed_everything(cfg.train.seed, deterministic=True)
    model = create_model(cfg.model.name, mean=data.mean, std=data.std)
    result = fit(model, data, cfg, torch.device("cpu"), hooks=Hooks(epoch_end=callback))
    return data, cfg, model, result


def served_small_model(prepared_dir: Path, overrides=()):
    """``train_small_model``'s net as the served graph (constants fitted on the fixture): (data, ServedModel)."""
    import torch

    from cifar.run.calibration import serve_model
    from cifar.run.export import model_metadata

    data, _, model, _ = train_small_model(prepared_dir, overrides)
    meta = model_metadata("small_cnn", 1.0, data.classes, data.mean, data.std, data_digest=data.digest)
    return data, serve_model(model, data, meta, torch.device("cpu"))


def log_served(served, data) -> str:
    """Log a served model to the active run as a training run does; returns its models:/ URI."""
    from cifar.tracking import log_onnx_model

    return log_onnx_model(served.proto, served.metadata, np.asarray(data.images["val"][:2]))


@pytest.fixture(scope="session")
def canonical_folder(tmp_path_factory, mini_raw) -> Path:
    return write_canonical_batches(tmp_path_factory.mktemp("canon") / "cifar-10-batches-py", mini_raw)


@pytest.fixture(scope="session")
def canonical_archive(tmp_path_factory, canonical_folder) -> Path:
    return make_tar(
        tmp_path_factory.mktemp("canon-tar") / "cifar-10-python.tar.gz", canonical_folder, "cifar-10-batches-py"
    )


@pytest.fixture(scope="session")
def imagefolder_archive(tmp_path_factory, mini_dir) -> Path:
    return make_tar(tmp_path_factory.mktemp("if-tar") / "cifar10-mini.tar.gz", mini_dir, "cifar10-mini")


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, mini_dir) -> Path:
    """The fixture prepared into a cache (400 train / 100 val / 200 test)."""
    from cifar.data import prepare_cache

    data_dir = tmp_path_factory.mktemp("prepared")
    prepare_cache(str(mini_dir), data_dir, val_size=100, seed=0, workers=1)
    return data_dir


@pytest.fixture
def tracking_env(tmp_path, monkeypatch):
    """A private SQLite tracking store; runs from tmp_path so ./mlruns lands there too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def wait_until_serving(url: str, server: subprocess.Popen, timeout: float) -> bool:
    """Whether ``url`` answered 200 within ``timeout`` seconds, while ``server`` kept running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return True
        except OSError:
            time.sleep(0.5)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], *, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run a project command in a subprocess, as a user would."""
    full_env = clean_env({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        [PYTHON, *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a server started with ``start_new_session=True`` and all its children; SIGKILL if it lingers."""
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def keep_screenshot(shot: Path) -> None:
    """A real page was drawn; ``$CIFAR_ARTIFACTS_DIR`` keeps the picture for a person to look at."""
    assert shot.stat().st_size > 20_000
    if os.environ.get("CIFAR_ARTIFACTS_DIR"):
        target = Path(os.environ["CIFAR_ARTIFACTS_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def relabelled(proto, metadata: dict, shift: int = 1, classes: list[str] | None = None):
    """The same network with its label table rotated by ``shift``: a genuinely different served model.

    Every image gets another label (class i is named class i+shift), so a test can tell which
    version answered; ``classes`` names them anew instead. Returns (proto, metadata) for
    ``cifar.tracking.log_onnx_model``.
    """
    import copy
    import json

    from cifar.contract import schema
    from cifar.run import export

    proto, metadata = copy.deepcopy(proto), copy.deepcopy(metadata)
    (table,) = [t for t in proto.graph.initializer if t.name == export.HEAD + "classes"]
    names = [s.decode() for s in table.string_data]
    rotated = list(classes) if classes else names[shift:] + names[:shift]
    table.string_data[:] = [n.encode() for n in rotated]
    (entry,) = [p for p in proto.metadata_props if p.key == schema.METADATA_KEY]
    entry.value = json.dumps({**json.loads(entry.value), "classes": rotated})
    metadata["classes"] = rotated
    return proto, metadata


STEP = 1.0  # virtual seconds per training step (the ``clock`` fixture)


class VirtualClock:
    """The engine's clock, advanced only by training steps: the deadline tests cannot feel the machine's load."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):  # anything else the engine asks of ``time``
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> VirtualClock:
    """The engine's ``time`` in budget, horizon and loop: each training step costs STEP seconds."""
    from cifar.engine import budget, horizon, loop

    clock = VirtualClock()
    for module in (budget, horizon, loop):
        monkeypatch.setattr(module, "time", clock)
    train_on = loop.Training.train_on

    def timed_step(self, x, y):
        clock.now += STEP
        return train_on(self, x, y)

    monkeypatch.setattr(loop.Training, "train_on", timed_step)
    return clock

"""The project's environment variables: read once, into one frozen object, at a command's entry."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from cifar.errors import CifarError
from cifar.settings import Settings, load_settings, settings


def test_defaults_and_every_variable_read():
    home = Settings.from_environ({"XDG_CACHE_HOME": "/xdg"})
    assert home.data_dir == Path("data") and home.source == "cifar10" and home.model_check_seconds == 60
    assert home.model_cache == Path("/xdg/cifar/models") and home.cifar10_url is None
    s = Settings.from_environ(
        {
            "CIFAR_DATA": "/d",
            "CIFAR_SOURCE": "/src.tar.gz",
            "CIFAR10_URL": "http://127.0.0.1:1/c.tar.gz",
            "CIFAR10_MD5": "abc",
            "CIFAR_CHECKPOINTS": "/ck",
            "CIFAR_OUTBOX": "/ob",
            "CIFAR_TENSORBOARD_DIR": "/tb",
            "CIFAR_MODEL_CACHE": "off",
            "CIFAR_FASHION_MNIST": "/fm",
            "CIFAR_MODEL_CHECK_SECONDS": "2.5",
        }
    )
    assert (s.data_dir, s.source, s.checkpoints, s.outbox, s.tensorboard_dir, s.fashion_mnist) == (
        Path("/d"),
        "/src.tar.gz",
        Path("/ck"),
        Path("/ob"),
        Path("/tb"),
        Path("/fm"),
    )
    assert (s.cifar10_url, s.cifar10_md5, s.model_cache, s.model_check_seconds) == (
        "http://127.0.0.1:1/c.tar.gz",
        "abc",
        None,
        2.5,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.data_dir = Path("elsewhere")  # frozen


def test_read_once_until_loaded_again(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR_DATA", str(tmp_path / "a"))
    assert settings().data_dir == tmp_path / "a"
    monkeypatch.setenv("CIFAR_DATA", str(tmp_path / "b"))
    assert settings().data_dir == tmp_path / "a"  # the command's view does not change under it
    assert load_settings().data_dir == tmp_path / "b"


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_value_is_one_clear_message(value):
    with pytest.raises(CifarError, match="CIFAR_MODEL_CHECK_SECONDS"):
        Settings.from_environ({"CIFAR_MODEL_CHECK_SECONDS": value})
    result = run_cli(["-m", "cifar.data", "info"], env={"CIFAR_MODEL_CHECK_SECONDS": value})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: CIFAR_MODEL_CHECK_SECONDS")


def test_only_the_settings_module_reads_the_environment():
    """No other module asks os.environ (or os.getenv) for anything but MLflow's and torchrun's own variables."""
    readers = []
    for path in [*(ROOT / "cifar").rglob("*.py"), *(ROOT / "streamlit_app").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "os.environ.get",
                "os.getenv",
                "os.environ.pop",
            ):
                key = node.args[0]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                key = node.slice
            else:
                continue
            name = key.value if isinstance(key, ast.Constant) else ast.unparse(key)
            if not name.startswith(("MLFLOW_", "WORLD_SIZE", "LOCAL_RANK")) and path.name != "settings.py":
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert readers == []

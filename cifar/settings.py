"""The project's own environment variables, read once into one frozen object.

Every command reads them at its entry (``cifar.cli.run_cli`` calls ``load_settings``); library
code asks ``settings()`` and never ``os.environ``. MLflow's and Optuna's own variables
(``MLFLOW_TRACKING_URI``, ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``, ...) stay theirs to read.

| variable | field | default |
| --- | --- | --- |
| CIFAR_DATA | data_dir | data |
| CIFAR_SOURCE | source | cifar10 (download) |
| CIFAR10_URL, CIFAR10_MD5 | cifar10_url, cifar10_md5 | the official archive |
| CIFAR_CHECKPOINTS | checkpoints | checkpoints |
| CIFAR_OUTBOX | outbox | mlflow-outbox |
| CIFAR_TENSORBOARD_DIR | tensorboard_dir | runs |
| CIFAR_MODEL_CACHE | model_cache (None: off) | $XDG_CACHE_HOME/cifar/models |
| CIFAR_FASHION_MNIST | fashion_mnist | Debian's dataset-fashion-mnist |
| CIFAR_MODEL_CHECK_SECONDS | model_check_seconds | 60 |
| CIFAR_MODEL_NAME | model_name (None: the app offers each model in production) | None |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cifar.errors import CifarError

_OFF = ("off", "0", "false", "no", "none")


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    source: str = "cifar10"
    cifar10_url: str | None = None
    cifar10_md5: str | None = None
    checkpoints: Path = Path("checkpoints")
    outbox: Path = Path("mlflow-outbox")
    tensorboard_dir: Path = Path("runs")
    model_cache: Path | None = None
    fashion_mnist: Path = Path("/usr/share/datasets/fashion-mnist")
    model_check_seconds: float = 60.0
    model_name: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        cache = get("CIFAR_MODEL_CACHE")
        if cache is None:
            cache = str(Path(get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifar" / "models")
        seconds = get("CIFAR_MODEL_CHECK_SECONDS") or "60"
        try:
            check = float(seconds)
        except ValueError:
            check = -1.0
        if not check > 0:
            raise CifarError(f"CIFAR_MODEL_CHECK_SECONDS={seconds!r}: give a number of seconds above 0.")
        base = cls()
        return cls(
            data_dir=Path(get("CIFAR_DATA") or base.data_dir),
            source=get("CIFAR_SOURCE") or base.source,
            cifar10_url=get("CIFAR10_URL"),
            cifar10_md5=get("CIFAR10_MD5"),
            checkpoints=Path(get("CIFAR_CHECKPOINTS") or base.checkpoints),
            outbox=Path(get("CIFAR_OUTBOX") or base.outbox),
            tensorboard_dir=Path(get("CIFAR_TENSORBOARD_DIR") or base.tensorboard_dir),
            model_cache=None if cache.lower() in _OFF else Path(cache).expanduser(),
            fashion_mnist=Path(get("CIFAR_FASHION_MNIST") or base.fashion_mnist),
            model_check_seconds=check,
            model_name=get("CIFAR_MODEL_NAME"),
        )


_loaded: Settings | None = None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the environment now; every later ``settings()`` returns what was read."""
    global _loaded
    _loaded = Settings.from_environ(environ)
    return _loaded


def settings() -> Settings:
    """The settings the command loaded at its entry (read on first use when imported as a library)."""
    return _loaded or load_settings()

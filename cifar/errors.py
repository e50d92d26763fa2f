"""The one exception type users see: its message says what is wrong and what to do."""

import os
import tempfile
from pathlib import Path


class CifarError(Exception):
    """A problem with the user's input or environment, reported as one clear message."""


class Pruned(Exception):
    """A training stopped early on purpose (a search's pruner): not a failure, never resumed.

    ``cifar.search`` raises it from its epoch callback and turns it into Optuna's ``TrialPruned``,
    so training and tracking need not know Optuna.
    """


def writable_dir(path, what: str, setting: str):
    """``path`` created if needed and checked writable now, before hours of work depend on it.

    ``what`` names the folder for the message; ``setting`` says how to choose another one.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CifarError(f"cannot write the {what} {path}: {reason}. Choose a writable folder: {setting}.") from None
    if not os.access(path, os.W_OK):
        raise CifarError(f"cannot write the {what} {path}. Choose a writable folder: {setting}.")
    return path

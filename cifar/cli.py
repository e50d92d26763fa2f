"""Shared command-line plumbing: one clear message and a non-zero exit instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from cifar.errors import CifarError
from cifar.settings import load_settings


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        load_settings()  # the environment, read once for the whole command
        return main(argv) or 0
    except CifarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # The tracking server or database refusing a request: say which, without a traceback.
        if type(exc).__module__.startswith(("mlflow", "optuna", "sqlalchemy", "requests")):
            print(f"error: {type(exc).__name__} from the tracking/search backend: {str(exc)[:1500]}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):  # a full disk, a folder that is a file, a permission: name it
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"error: {exc.strerror or exc}{where}. Free space or choose a writable folder.", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

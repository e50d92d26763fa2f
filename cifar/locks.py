"""Cross-process locks for the embedded SQLite stores (a server serialises its own writes)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

from filelock import FileLock


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (relative to the working folder unless it has four
    slashes), without its ``?options``; None for any other store."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(unquote(url.removeprefix("sqlite:///").split("?")[0])).absolute()


@contextlib.contextmanager
def sqlite_lock(url: str, purpose: str, timeout: float = 120) -> Iterator[None]:
    """Hold ``<database>.<purpose>.lock`` while working on a ``sqlite:///`` database; no-op otherwise."""
    database = sqlite_file(url)
    if database is not None:
        with FileLock(f"{database}.{purpose}.lock", timeout=timeout):
            yield
    else:
        yield

"""Cross-process locks for the embedded SQLite stores (a server serialises its own writes)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def sqlite_lock(url: str, purpose: str, timeout: float = 120) -> Iterator[None]:
    """Hold ``<database>.<purpose>.lock`` while working on a ``sqlite:///`` database; no-op otherwise."""
    if url.startswith("sqlite:///"):
        from filelock import FileLock

        with FileLock(f"{url.removeprefix('sqlite:///')}.{purpose}.lock", timeout=timeout):
            yield
    else:
        yield

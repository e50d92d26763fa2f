"""Local copies of registry models, reused while the registry's SQLite file is unchanged.

Resolving ``models:/name@alias`` through MLflow costs ~2.8 s before the first image on the local
SQLite store (``import mlflow`` 1.3 s, opening the SQLAlchemy store 1.4 s): more than scoring
1,000 images. An alias or stage can only move by a write to that file, so a copy made while the
file had a given (inode, size, mtime), for the -wal and -journal files too, is still the model the
URI names while they are the same: the check is exact, not a time-to-live. Anything else asks
MLflow every time: a server (http, postgresql), a ``runs:/`` URI (a run's artifacts can be
rewritten without touching the database), or ``CIFAR_MODEL_CACHE=off``. A copy whose files no
longer match the SHA-256 taken when it was made counts as absent, so it is fetched again.
Imports no mlflow.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cifar.contract.registered_model import pinned_uri
from cifar.locks import sqlite_file
from cifar.settings import settings

_STALE_S = 60  # older copies of the same URI are removed once no loader can still be reading them


def cache_root() -> Path | None:
    """``$CIFAR_MODEL_CACHE``, else ``$XDG_CACHE_HOME/cifar/models`` (``~/.cache``); None when off."""
    return settings().model_cache


def _key(uri: str) -> str:
    """What decides which store and model a URI means here: the URI, the MLflow variables, the folder."""
    ident = [uri, os.environ.get("MLFLOW_TRACKING_URI", ""), os.environ.get("MLFLOW_REGISTRY_URI", ""), os.getcwd()]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]


def _file_store_data() -> bool:
    """MLflow's default URI falls back to ./mlruns when it holds file-store experiments."""
    try:
        with os.scandir("mlruns") as entries:
            return any(e.name.isdigit() and os.path.isfile(os.path.join(e.path, "meta.yaml")) for e in entries)
    except OSError:
        return False


def store_state(tracking_uri: str, registry_uri: str) -> list[Any] | None:
    """A fingerprint that changes with every write to the SQLite store; None for any other store."""
    files = {sqlite_file(tracking_uri), sqlite_file(registry_uri)}
    if None in files:
        return None
    state: list[Any] = []
    for db in sorted(files):
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-journal")):
            try:
                s = path.stat()
                state.append([str(path), s.st_ino, s.st_size, s.st_mtime_ns])
                if path == db:  # mtime moves per clock tick (ms): two same-size writes within one look alike
                    with open(db, "rb") as f:
                        f.seek(24)  # SQLite's file change counter, bumped by every commit outside WAL mode
                        state[-1].append(int.from_bytes(f.read(4), "big"))
            except FileNotFoundError:
                state.append([str(path), None])
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        state.append(["file-store data in ./mlruns", _file_store_data()])
    return state


def cached_copy(uri: str) -> tuple[Path, str] | None:
    """The copy of ``uri``'s model and what it resolved to, if the store has not changed since; else None."""
    root = cache_root()
    if root is None or not uri.startswith("models:/"):
        return None
    try:
        entry = json.loads((root / f"{_key(uri)}.json").read_text())
        local = root / entry["path"]
        fresh = entry["uri"] == uri and store_state(entry["tracking_uri"], entry["registry_uri"]) == entry["state"]
        # A damaged copy (disk, a stray edit) would load wrong weights or fail: fetch it again.
        intact = fresh and files_digest(local) == entry["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (local, entry["resolved"]) if intact else None


def files_digest(path: Path) -> str:
    """SHA-256 over a file, or over a folder's files with their relative paths; OSError if absent.

    Far cheaper than asking MLflow again (benchmarks/cache_check.py).
    """
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            digest.update(f"{file.relative_to(path)}\0".encode())
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _temporary_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="cifar-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _fetch(uri: str, folder: Path) -> Path:
    """Download ``uri`` into ``folder``; nothing is left there unless it holds an ONNX model."""
    import mlflow  # lazy: ~1 s; a warm cache never imports it (the point of this module)

    try:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder)))
        if not (local.is_file() or any(local.rglob("*.onnx"))):  # MLflow "downloads" a deleted model as nothing
            raise FileNotFoundError(f"the artifact store holds no ONNX file for {uri} (deleted?)")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return local


def download_model(uri: str) -> tuple[Path, str]:
    """Fetch ``uri`` with MLflow, keeping a copy for ``cached_copy`` when the store allows it.

    Returns the local path and what the URI resolved to (``models:/name/3`` for an alias).
    """
    import mlflow  # lazy: ~1 s; a warm cache never imports it (the point of this module)

    tracking_uri, registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    root = cache_root() if uri.startswith("models:/") else None
    # The fingerprint is taken before resolving: a write meanwhile makes the next call ask again.
    state = store_state(tracking_uri, registry_uri) if root else None
    resolved = pinned_uri(uri) if uri.startswith("models:/") else uri
    if state is None:
        return _fetch(resolved, _temporary_folder()), resolved
    key = _key(uri)
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=root))
    except OSError:  # an unwritable cache folder costs speed, not the prediction
        return _fetch(resolved, _temporary_folder()), resolved
    local = _fetch(resolved, folder)
    entry = {
        "uri": uri,
        "resolved": resolved,
        "tracking_uri": tracking_uri,
        "registry_uri": registry_uri,
        "state": state,
        "path": str(local.relative_to(root)),
        "sha256": files_digest(local),
    }
    staged = root / f"{key}.json.{os.getpid()}"
    try:
        staged.write_text(json.dumps(entry))
        os.replace(staged, root / f"{key}.json")  # atomic: a concurrent reader sees the old entry or the new
        for old in root.glob(f"{key}-*"):
            if old != folder and time.time() - old.stat().st_mtime > _STALE_S:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:  # a full disk or a copy removed meanwhile: this call still has its model
        pass
    return local, resolved

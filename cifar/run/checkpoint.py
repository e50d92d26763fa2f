"""Training checkpoints as data: one safetensors file (tensors) with a JSON header (everything else).

Nothing here unpickles: a pickle planted where a checkpoint is expected is refused before any of
it is read. Writes go to a temporary file in the same folder, then ``os.replace``: a crash or a
full disk leaves the previous checkpoint, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cifar.errors import CifarError
from cifar.settings import settings

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "cifar-checkpoint/1"


def save_checkpoint(path: Path, tensors: dict[str, Any], info: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` (name -> torch tensor) and ``info`` (JSON-able) to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, str(tmp), metadata={"format": FORMAT, "info": json.dumps(info)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:  # safetensors reports ENOSPC/EFBIG as its own error
        with contextlib.suppress(OSError):  # the folder itself may be what failed
            tmp.unlink(missing_ok=True)
        raise CifarError(
            f"could not write the checkpoint {path}: {getattr(exc, 'strerror', None) or exc}. Free space or "
            "choose a writable folder (CIFAR_CHECKPOINTS); the previous checkpoint, if any, is intact."
        ) from None
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, info) from a checkpoint file; refuses anything that is not one, naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CifarError(f"checkpoint {path} does not exist.")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80" or head == b"PK":  # a pickle protocol marker, or torch.save's zip
        raise CifarError(
            f"{path} is a pickle (torch.save) file, not a safetensors checkpoint; it was not loaded, "
            "because unpickling can run code. Only checkpoints written by this project can be resumed."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CifarError(f"{path} is not a readable safetensors checkpoint (truncated or edited?): {exc}") from None
    if metadata.get("format") != FORMAT:
        raise CifarError(f"{path} is a safetensors file but not a cifar training checkpoint ({FORMAT}).")
    try:
        info = json.loads(metadata["info"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CifarError(f"{path}: the checkpoint's header is damaged ({exc}).") from None
    return tensors, info


def checkpoint_root() -> Path:
    return settings().checkpoints

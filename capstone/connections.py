"""Resolve the Postgres a collection writes to from an Airflow connection.

One function, :func:`postgres_params`, turns an Airflow connection into :class:`PostgresParams`:
host, port, login, password, database and every libpq option the connection carries in its
extras or its URI's query (``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``, ``options``,
``connect_timeout``, ``target_session_attrs``, ``application_name``, ...). From it psycopg gets a
conninfo string (:meth:`PostgresParams.conninfo`) and asyncpg its connect arguments
(:meth:`PostgresParams.asyncpg_arguments`: the TLS options in its DSN's query, where asyncpg reads
them with libpq's meaning; session options in the startup packet; options it cannot enforce
refused rather than dropped).

An undefined connection is an error (:class:`ConnectionNotDefined`) that names the connection
and how to define it. There is no fallback: the embedded Postgres is used only where the local
set-up (Makefile, local Airflow stack, test suite) defines the connection to it explicitly, so a
production worker with a missing connection fails instead of indexing into a private database.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from capstone.errors import TerminalError
from capstone.settings import DEFAULT_CONNECTION_ID

if TYPE_CHECKING:
    import psycopg
    from airflow.sdk import Connection

__all__ = [
    "DEFAULT_CONNECTION_ID",
    "ConnectionNotDefined",
    "PostgresConnectionRefused",
    "PostgresParams",
    "airflow_connection",
    "apostgres_params",
    "connect",
    "postgres_dsn",
    "postgres_params",
    "refusal_reason",
]

log = logging.getLogger(__name__)


# Extras that Airflow's Postgres provider reads itself: not libpq options, never passed on.
_PROVIDER_EXTRAS = frozenset(
    {
        "__extra__",
        "aws_conn_id",
        "azure_conn_id",
        "cluster-identifier",
        "cursor",
        "enable_log_db_messages",
        "iam",
        "redshift",
        "redshift-serverless",
        "region_name",
        "sqlalchemy_query",
        "sqlalchemy_scheme",
        "workgroup-name",
    }
)
# The connection's own fields: an extra of the same name would contradict them.
_FIELDS = frozenset({"host", "hostaddr", "port", "user", "password", "dbname"})
# libpq options asyncpg reads from a DSN's query (connect_utils._parse_connect_dsn_and_args).
_ASYNCPG_DSN_OPTIONS = frozenset(
    {
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "passfile",
        "service",
    }
)
# libpq options asyncpg sends in the startup packet, as the server reads them.
_ASYNCPG_STARTUP_OPTIONS = frozenset({"application_name", "options"})
# Options whose restrictive values asyncpg would silently drop (or misread): refused, not weakened.
_ASYNCPG_UNENFORCEABLE = frozenset(
    {
        ("channel_binding", "require"),
        ("gssencmode", "require"),
        ("sslcertmode", "require"),
        ("sslrootcert", "system"),
    }
)
# Options whose values are secrets: never shown in messages.
_SECRET_OPTIONS = frozenset({"sslpassword"})


POSTGRES_EXAMPLE_URI = "postgresql://USER:PASSWORD@HOST:5432/DB"


class ConnectionNotDefined(TerminalError, LookupError):
    """The Airflow connection a collection names does not exist (where its tasks run)."""

    def __init__(self, connection_id: str, example_uri: str = POSTGRES_EXAMPLE_URI) -> None:
        self.connection_id = connection_id
        postgres = example_uri == POSTGRES_EXAMPLE_URI
        super().__init__(
            f"Airflow connection {connection_id!r} is not defined where this runs (or could not be "
            "read): define it in the UI, "
            f"with `airflow connections add {connection_id} --conn-uri {example_uri}`, "
            f"or as the environment variable AIRFLOW_CONN_{connection_id.upper()} (in every worker and the "
            "triggerer); nothing was written."
            + (
                " The embedded Postgres is never used in its place (`make demo`, `make up` and the tests "
                "define the connection to it themselves)"
                if postgres
                else ""
            )
        )


class PostgresConnectionRefused(TerminalError):
    """The server refused the connection for a reason no retry changes (authentication, TLS, a
    missing database or role); the message says what to fix."""


@dataclass(frozen=True, repr=False)
class PostgresParams:
    """Where and how to connect: the connection's fields plus its libpq options, typed once."""

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str | None = None
    dbname: str = "postgres"
    options: Mapping[str, str] = field(default_factory=dict)
    source: str = "the given DSN"

    @classmethod
    def from_connection(
        cls, conn: Any, connection_id: str, extras: Mapping[str, Any] | None = None
    ) -> PostgresParams:
        """From an Airflow ``Connection``: its fields, and its extras (or URI query) as libpq options
        (``extras`` when already read, as the triggerer reads them, asynchronously)."""
        if extras is None:
            extras = conn.extra_dejson or {}
        return cls(
            host=conn.host or "127.0.0.1",
            port=int(conn.port or 5432),
            user=conn.login or "postgres",
            password=conn.password or None,
            dbname=conn.schema or "postgres",
            options=_libpq_options(extras, connection_id),
            source=f"Airflow connection {connection_id!r}",
        )

    @classmethod
    def from_dsn(cls, dsn: str, source: str = "the given DSN") -> PostgresParams:
        """From a ``postgresql://`` URI or a ``key=value`` conninfo string (libpq's own parsing)."""
        from psycopg.conninfo import conninfo_to_dict

        parts = {key: str(value) for key, value in conninfo_to_dict(dsn).items() if value is not None}
        return cls(
            host=parts.pop("host", "127.0.0.1"),
            port=int(parts.pop("port", 5432)),
            user=parts.pop("user", "postgres"),
            password=parts.pop("password", None),
            dbname=parts.pop("dbname", "postgres"),
            options=parts,
            source=source,
        )

    def conninfo(self) -> str:
        """The libpq connection string psycopg connects with (password included: never log it)."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            "",
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            **self.options,
        )

    def asyncpg_arguments(self, application_name: str) -> dict[str, Any]:
        """Keyword arguments of ``asyncpg.connect``: TLS and session options in the DSN's query (where
        asyncpg reads them, with libpq's meaning), startup options as server settings."""
        self._check_asyncpg_can_enforce()
        host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
        query = {"host": host, "port": str(self.port), "user": self.user, "dbname": self.dbname}
        query.update({key: value for key, value in self.options.items() if key in _ASYNCPG_DSN_OPTIONS})
        settings = {"application_name": application_name}
        settings.update({key: v for key, v in self.options.items() if key in _ASYNCPG_STARTUP_OPTIONS})
        arguments: dict[str, Any] = {
            "dsn": "postgresql://?" + urlencode(query),
            "password": self.password,
            "server_settings": settings,
        }
        timeout = int(self.options.get("connect_timeout", "0") or 0)
        if timeout > 0:  # libpq: 0 or less waits forever, less than 2 counts as 2
            arguments["timeout"] = float(max(2, timeout))
        ignored = sorted(
            set(self.options) - _ASYNCPG_DSN_OPTIONS - _ASYNCPG_STARTUP_OPTIONS - {"connect_timeout"}
        )
        if ignored:
            log.warning("%s: asyncpg (index builds) has no equivalent of %s", self.source, ", ".join(ignored))
        return arguments

    def _check_asyncpg_can_enforce(self) -> None:
        """Refuse, rather than weaken, what the triggerer's driver cannot enforce."""
        unenforceable = {
            key: value
            for key, value in self.options.items()
            if (key, value) in _ASYNCPG_UNENFORCEABLE or (key == "require_auth" and value)
        }
        if unenforceable:
            shown = ", ".join(f"{key}={value}" for key, value in sorted(unenforceable.items()))
            raise PostgresConnectionRefused(
                f"{self.source}: {shown} cannot be enforced by asyncpg, which builds the index in the "
                "triggerer; remove it from the connection (TLS with sslmode=verify-full and an "
                "sslrootcert file is enforced), or build in the worker (deferrable=False)"
            )

    def __repr__(self) -> str:
        return f"PostgresParams({self.describe()})"

    def describe(self) -> str:
        """``user@host:port/dbname`` and the options, with no password, for messages."""
        shown = {key: ("***" if key in _SECRET_OPTIONS else value) for key, value in self.options.items()}
        options = "".join(f" {key}={value}" for key, value in sorted(shown.items()))
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}{options} ({self.source})"


def _libpq_options(extras: Mapping[str, Any], connection_id: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, value in extras.items():
        if key in _PROVIDER_EXTRAS or value is None:
            continue
        if key in _FIELDS:
            log.warning(
                "Airflow connection %r: extra %r is ignored: set it in the connection's own field",
                connection_id,
                key,
            )
            continue
        if key not in _libpq_keywords():
            log.warning("Airflow connection %r: extra %r is not a libpq option; ignored", connection_id, key)
            continue
        options[key] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return options


def _is_ipv6(host: str) -> bool:
    import ipaddress

    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def _libpq_keywords() -> frozenset[str]:
    from psycopg import pq

    return frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults())


def _airflow_connection_not_found() -> type[Exception]:
    from airflow.sdk.exceptions import AirflowNotFoundException

    return AirflowNotFoundException


# Airflow reports a connection it could not *read* (the API server restarting, a secrets backend
# down) as not found: ask a few times before calling it undefined.
LOOKUP_ATTEMPTS = 3
LOOKUP_PAUSE_SECONDS = 2.0


def airflow_connection(
    connection_id: str, attempts: int = LOOKUP_ATTEMPTS, example_uri: str = POSTGRES_EXAMPLE_URI
) -> Connection:
    """Airflow connection ``connection_id``, looked up ``attempts`` times before it is called undefined.

    Raises :class:`ConnectionNotDefined` (whose fix shows ``example_uri``).
    """
    import time

    from airflow.sdk import BaseHook

    for attempt in range(1, attempts + 1):
        try:
            return BaseHook.get_connection(connection_id)
        except _airflow_connection_not_found():
            if attempt < attempts:
                time.sleep(LOOKUP_PAUSE_SECONDS)
    raise ConnectionNotDefined(connection_id, example_uri)


def postgres_params(
    connection_id: str = DEFAULT_CONNECTION_ID, attempts: int = LOOKUP_ATTEMPTS
) -> PostgresParams:
    """The Postgres of Airflow connection ``connection_id`` (synchronous: tasks, CLIs, tests).

    Raises :class:`ConnectionNotDefined` when the connection is still not found after
    ``attempts`` lookups (one for interactive commands, which read no Airflow API).
    """
    return PostgresParams.from_connection(airflow_connection(connection_id, attempts), connection_id)


async def apostgres_params(connection_id: str = DEFAULT_CONNECTION_ID) -> PostgresParams:
    """:func:`postgres_params` through Airflow's async connection API (for the triggerer)."""
    import asyncio

    from airflow.sdk import BaseHook

    for attempt in range(1, LOOKUP_ATTEMPTS + 1):
        try:
            conn = await BaseHook.aget_connection(connection_id)
        except _airflow_connection_not_found():
            if attempt < LOOKUP_ATTEMPTS:
                await asyncio.sleep(LOOKUP_PAUSE_SECONDS)
            continue
        return PostgresParams.from_connection(conn, connection_id, await _aextra(conn))
    raise ConnectionNotDefined(connection_id)


async def _aextra(conn: Any) -> dict[str, Any]:
    """A connection's extras from async code. Airflow 3.3 added ``aextra_dejson`` (its sync twin
    masks secrets in a way that raises inside the triggerer's event loop); Airflow 3.2 has only
    ``extra_dejson``, whose masking is safe there."""
    aextra_dejson = getattr(conn, "aextra_dejson", None)
    if aextra_dejson is None:  # Airflow 3.2
        return dict(conn.extra_dejson or {})
    return dict(await aextra_dejson() or {})


def postgres_dsn(connection_id: str = DEFAULT_CONNECTION_ID, attempts: int = LOOKUP_ATTEMPTS) -> str:
    """The libpq connection string of ``connection_id``, options included (password included)."""
    return postgres_params(connection_id, attempts).conninfo()


# Server and libpq messages of refusals no retry can change, and what to do about each.
_REFUSALS: tuple[tuple[str, str], ...] = (
    (
        "no encryption",
        "no pg_hba.conf rule admits this connection without TLS: if the server requires TLS (managed "
        "Postgres does), set sslmode=require or verify-full; otherwise ask for a pg_hba.conf entry",
    ),
    ("password authentication failed", "check the connection's login and password"),
    ("no pg_hba.conf entry", "the server's pg_hba.conf admits no such connection: check user, database, TLS"),
    ("pg_hba.conf rejects", "the server's pg_hba.conf rejects this user, database or address"),
    ("does not exist", "check the connection's database (schema field) and login"),
    ("certificate verify failed", "the server's certificate is not signed by the CA in sslrootcert"),
    ("does not match host name", "the server's certificate is for another host name: connect by that name"),
    ("root certificate file", "set sslrootcert to the CA file that signed the server's certificate"),
    ("server does not support SSL", "the server has TLS off: use sslmode=disable or prefer, or enable ssl"),
    ("rejected SSL upgrade", "the server has TLS off: use sslmode=disable or prefer, or enable ssl"),
    ("certificate", "check sslcert, sslkey and sslrootcert"),
    ("permission denied", "grant the connection's login the right to connect to this database"),
    ("invalid sslmode", "sslmode must be disable, allow, prefer, require, verify-ca or verify-full"),
    ("invalid connection option", "remove the option from the connection's extras"),
)


def refusal_reason(message: str) -> str | None:
    """What to fix when ``message`` (of a failed connection attempt) is a refusal no retry changes;
    None for a transient failure (refused or reset socket, server starting or shutting down)."""
    lowered = message.lower()
    for fragment, fix in _REFUSALS:
        if fragment.lower() in lowered:
            return fix
    return None


def connect(params: PostgresParams, *, application_name: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection (autocommit by default); a refusal no retry changes raises
    :class:`PostgresConnectionRefused` naming the server and the fix, other failures stay
    ``psycopg.OperationalError`` (transient: the task's retry may succeed)."""
    import psycopg

    kwargs.setdefault("autocommit", True)
    if "application_name" not in params.options:
        kwargs["application_name"] = application_name
    try:
        return psycopg.connect(params.conninfo(), **kwargs)
    except psycopg.OperationalError as exc:
        fix = refusal_reason(str(exc))
        if fix is None:
            raise
        raise PostgresConnectionRefused(
            f"Postgres at {params.describe()} refused the connection: {_first_line(exc)}; {fix}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "FATAL:" in line or "error" in line.lower():
            return line.strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Resolve the Postgres a collection writes to from an Airflow connection.

``vector_store_default`` falls back to the embedded default server when no such connection is
defined, so a fresh checkout works with no set-up; any other connection id must exist.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

__all__ = ["DEFAULT_CONNECTION_ID", "apostgres_dsn", "postgres_dsn"]

log = logging.getLogger(__name__)

DEFAULT_CONNECTION_ID = "vector_store_default"


def _dsn(host: str | None, port: int | None, login: str | None, password: str | None, db: str | None) -> str:
    auth = quote(login or "postgres", safe="")
    if password:
        auth += ":" + quote(password, safe="")
    return f"postgresql://{auth}@{host or '127.0.0.1'}:{port or 5432}/{quote(db or 'postgres', safe='')}"


def _embedded_dsn(connection_id: str) -> str:
    from capstone.embedded_pg import default_server

    server = default_server()
    log.info(
        "connection %r is not defined: using the embedded Postgres on port %s", connection_id, server.port
    )
    return server.start().uri()


def postgres_dsn(connection_id: str = DEFAULT_CONNECTION_ID) -> str:
    """A libpq URI for ``connection_id`` (synchronous; for tasks, CLIs and tests)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(connection_id)
    except AirflowNotFoundException:
        if connection_id == DEFAULT_CONNECTION_ID:
            return _embedded_dsn(connection_id)
        raise
    return _dsn(conn.host, conn.port, conn.login, conn.password, conn.schema)


async def apostgres_dsn(connection_id: str = DEFAULT_CONNECTION_ID) -> str:
    """A libpq URI for ``connection_id`` using Airflow's async connection API (for triggers)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = await BaseHook.aget_connection(connection_id)
    except AirflowNotFoundException:
        if connection_id == DEFAULT_CONNECTION_ID:
            import asyncio

            return await asyncio.to_thread(_embedded_dsn, connection_id)
        raise
    return _dsn(conn.host, conn.port, conn.login, conn.password, conn.schema)

"""Index builds that the server ends: cancelled, timed out or killed mid-build.

Each must end in one clear ``error`` event naming the index, leave no INVALID index behind (a
failed ``CREATE INDEX CONCURRENTLY`` keeps one), and the next attempt must build the index.
The trigger's own timeout, restarts and parameter changes are covered in tests/integration.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
import pytest
from psycopg import sql

from capstone.index_build import build_index
from tests.support.index_build import (
    IndexRow,
    create_collection,
    indexes_on,
    params_of,
    run_trigger,
    trigger_kwargs,
    wait_for_build,
)

pytestmark = pytest.mark.slow

log = logging.getLogger("test_index_build_faults")
ROWS = 8_000  # a build of a few seconds on 2 cores: long enough to be interrupted mid-way


async def _interrupted_build(
    conn: psycopg.Connection, schema: str, kwargs: dict[str, Any], interrupt: str
) -> dict[str, Any]:
    """Run the trigger and call ``interrupt`` (a Postgres function of a pid) on its build backend."""
    running = asyncio.create_task(run_trigger(kwargs))
    pid = await wait_for_build(conn, schema, kwargs["index"].index_name)
    conn.execute(sql.SQL("SELECT {}(%s)").format(sql.Identifier(interrupt)), (pid,))
    return await asyncio.wait_for(running, timeout=60)


@pytest.mark.parametrize(
    ("interrupt", "server_says"),
    [
        ("pg_cancel_backend", "canceling statement due to user request"),
        ("pg_terminate_backend", "terminating connection due to administrator command"),
    ],
)
async def test_build_ended_by_the_server_is_an_error_event_and_leaves_no_invalid_index(
    pg_conn: psycopg.Connection, pg_schema: str, interrupt: str, server_says: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", ROWS)
    kwargs = trigger_kwargs(pg_schema, "docs", ROWS)
    params = params_of(kwargs)

    event = await _interrupted_build(pg_conn, pg_schema, kwargs, interrupt)

    assert event["status"] == "error", event
    assert event["collection_name"] == "docs"
    assert f'index "{pg_schema}"."{params.index_name}"' in event["message"]
    assert server_says in event["message"]
    assert indexes_on(pg_conn, pg_schema, "docs") == []
    retried = await run_trigger(kwargs)  # the sensor's retry defers again
    assert retried["status"] == "success" and retried["indexed_count"] == ROWS
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(params.index_name, "hnsw", True)]


async def test_statement_timeout_of_the_server_is_an_error_event_and_leaves_no_invalid_index(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", ROWS)
    params = params_of(trigger_kwargs(pg_schema, "docs", ROWS))
    # A DBA's statement_timeout, as a role or database setting would impose it on every session.
    strict = f"{pg_dsn}?options=-c%20statement_timeout%3D300"  # libpq's options, as asyncpg sends them

    event = await build_index(strict, params, ROWS, poll_interval=0.05, timeout=60, log=log)

    assert event["status"] == "error", event
    assert "could not be built: canceling statement due to statement timeout" in event["message"]
    assert indexes_on(pg_conn, pg_schema, "docs") == []
    event = await build_index(pg_dsn, params, ROWS, poll_interval=0.05, timeout=60, log=log)
    assert event["status"] == "success" and event["builds_started"] == 1
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(params.index_name, "hnsw", True)]

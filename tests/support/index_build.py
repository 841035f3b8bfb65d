"""Helpers for the index build tests: collection tables of real vectors, the index catalog, and
waiting for a build (or its backend) as Postgres reports it.

Run as a module, it runs one ``VectorStoreIndexingTrigger`` to completion in its own process, so
the kill test can SIGKILL a triggerer mid-build::

    python -m tests.support.index_build SCHEMA TABLE EXPECTED_COUNT
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone import store
from capstone.index_build import IndexParams
from tests.support.settings import index_params

__all__ = [
    "IndexRow",
    "create_collection",
    "indexes_on",
    "params_of",
    "random_unit_vectors",
    "run_trigger",
    "trigger_kwargs",
    "wait_for_build",
    "wait_until_gone",
]

BUILDERS_SQL = """
SELECT p.pid, p.phase FROM pg_stat_progress_create_index p
JOIN pg_class c ON c.oid = p.index_relid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""

# The builds the tests time (kill test, progress logging) need a few seconds of work on 2 cores.
DIMENSION = 64


def random_unit_vectors(rows: int, dimension: int = DIMENSION, seed: int = 0) -> np.ndarray:
    """``rows`` random L2-normalised float32 vectors."""
    vectors = np.random.default_rng(seed).standard_normal((rows, dimension)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def create_collection(
    conn: psycopg.Connection, schema: str, table: str, rows: int, dimension: int = DIMENSION
) -> None:
    """Create the collection table as the pipeline does and COPY ``rows`` random vectors into it."""
    target = sql.Identifier(schema, table)
    store.ensure_collection_table(conn, store.CollectionTable(schema, table, dimension, "english", "vector"))
    register_vector(conn)
    copy = sql.SQL(
        "COPY {} (id, document_id, chunk_index, content, content_hash, embedding, embedding_model) "
        "FROM STDIN WITH (FORMAT BINARY)"
    ).format(target)
    with conn.cursor().copy(copy) as writer:
        writer.set_types(["text", "text", "int4", "text", "text", "vector", "text"])
        for i, vector in enumerate(random_unit_vectors(rows, dimension)):
            document = f"doc{i // 10}"
            writer.write_row(
                (f"{document}_chunk_{i % 10}", document, i % 10, f"text {i}", f"h{i}", vector, "test")
            )


@dataclass(frozen=True)
class IndexRow:
    """An index on the collection table, as the catalog sees it."""

    name: str
    method: str
    valid: bool


def indexes_on(
    conn: psycopg.Connection, schema: str, table: str, column: str = "embedding"
) -> list[IndexRow]:
    """Every index on ``column`` of the table (valid or not), by name."""
    rows = conn.execute(
        """
        SELECT c.relname, am.amname, i.indisvalid
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_am am ON am.oid = c.relam
        JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0]
        WHERE n.nspname = %s AND t.relname = %s AND a.attname = %s
        ORDER BY c.relname
        """,
        (schema, table, column),
    ).fetchall()
    return [IndexRow(name, method, valid) for name, method, valid in rows]


def trigger_kwargs(schema: str, table: str, expected_count: int, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a ``VectorStoreIndexingTrigger`` for the test table (the spec's default
    index, on the ``vector_store_default`` connection)."""
    return {
        "collection_name": table,
        "expected_count": expected_count,
        "index": index_params(schema, table),
        "connection_id": "vector_store_default",
        "poll_interval": 0.05,
        "timeout": 120.0,
        **overrides,
    }


def params_of(kwargs: dict[str, Any]) -> IndexParams:
    """The ``IndexParams`` a trigger built from ``kwargs`` uses."""
    from capstone.triggers import VectorStoreIndexingTrigger

    return VectorStoreIndexingTrigger(**kwargs).params


async def run_trigger(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run a trigger to its (single) event and return the event payload."""
    from capstone.triggers import VectorStoreIndexingTrigger

    trigger = VectorStoreIndexingTrigger(**kwargs)
    events = [event async for event in trigger.run()]
    assert len(events) == 1, events
    return dict(events[0].payload)


async def wait_for_build(
    conn: psycopg.Connection, schema: str, name: str, phase: str = "building index", within: float = 30.0
) -> int:
    """Pid of the backend building index ``name`` once its phase starts with ``phase`` (by default:
    building, not waiting for older transactions)."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        for pid, current in conn.execute(BUILDERS_SQL, (schema, name)).fetchall():
            if str(current).startswith(phase):
                return int(pid)
        await asyncio.sleep(0.02)
    raise AssertionError(f"no build of {name} reached {phase!r} within {within}s")


async def wait_until_gone(conn: psycopg.Connection, pid: int, within: float = 5.0) -> None:
    """Return once backend ``pid`` has ended; fail if it still runs after ``within`` seconds."""
    for _ in range(int(within / 0.05)):
        if conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"backend {pid} still ran {within}s after its client went away")


def main(argv: list[str]) -> None:
    """Entry point of the kill test's triggerer stand-in: run one trigger, print its event."""
    schema, table, expected = argv
    print(
        asyncio.run(run_trigger(trigger_kwargs(schema, table, int(expected), poll_interval=0.2))), flush=True
    )


if __name__ == "__main__":
    main(sys.argv[1:])

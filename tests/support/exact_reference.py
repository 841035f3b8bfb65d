"""Exact search one query at a time, in SQL: the reference the one-pass scan of
:mod:`capstone.exact_scan` (what validation uses) is checked against.

It runs on a connection of its own with index scans off for the whole session, and with SQL text of
its own: a plan prepared under one set of planner settings must never be reused under the other
(drivers cache prepared statements per text).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone.index_build import DISTANCE_OPERATORS
from capstone.search import SNIPPET_CHARS, Hit, SearchTarget, hits_from_rows

_EXACT_SESSION = ("enable_indexscan", "enable_bitmapscan", "enable_indexonlyscan")


def exact_statement(target: SearchTarget) -> sql.Composed:
    """The exact query: rows ranked by distance alone in the scan, the nearest read back by ``ctid``."""
    operator = sql.SQL(DISTANCE_OPERATORS[target.metric])
    return sql.SQL(
        "/* exact search: index scans off */ SELECT t.id, t.document_id, t.chunk_index, n.distance,"
        " left(t.content, {snippet}) FROM (SELECT ctid AS row_ctid,"
        " embedding {op} %(query)s{cast} AS distance FROM {table} WHERE embedding IS NOT NULL"
        " ORDER BY embedding {op} %(query)s{cast} LIMIT %(limit)s) n"
        " JOIN {table} t ON t.ctid = n.row_ctid ORDER BY n.distance"
    ).format(
        op=operator, cast=target.table.cast, snippet=sql.Literal(SNIPPET_CHARS), table=target.table.ident
    )


@contextmanager
def exact_connection(dsn: str) -> Iterator[psycopg.Connection]:
    """A connection of its own for exact search: index scans off for the session, nothing prepared."""
    with psycopg.connect(
        dsn, autocommit=True, prepare_threshold=None, application_name="capstone exact search"
    ) as conn:
        for setting in _EXACT_SESSION:
            conn.execute("SELECT set_config(%s, 'off', false)", (setting,))
        register_vector(conn)
        yield conn


def exact_search(conn: psycopg.Connection, target: SearchTarget, vector: np.ndarray, limit: int) -> list[Hit]:
    """The true ``limit`` nearest chunks; call on an :func:`exact_connection`."""
    query = {"query": np.asarray(vector, dtype=np.float32), "limit": limit}
    return hits_from_rows(conn.execute(exact_statement(target), query).fetchall(), target.metric)

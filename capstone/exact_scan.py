"""Exact nearest neighbours of many query vectors in one pass over a collection table.

Validation compares the index with exact search for a sample of stored vectors. One exact query
per sampled vector scans the whole table each time (50 scans of 100k x 384 took ~3 s here, and
the cost grows with sample x rows); this module scans it once:

1. ``COPY (SELECT ctid, embedding ...) TO STDOUT (FORMAT BINARY)`` streams every vector; the
   records have a fixed size, so numpy reads them in blocks without a Python loop per row;
2. numpy keeps, per query, the ``limit + margin`` nearest rows seen so far (float32 distances);
3. those candidates are read back by ``ctid`` and ranked with pgvector's own distance operator,
   so the answer is the one ``ORDER BY embedding <op> query LIMIT n`` gives (the margin absorbs
   the rounding differences between numpy and pgvector near the cut).

Steps 1 and 3 run in one REPEATABLE READ transaction: the ``ctid`` s point at the rows the scan saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import psycopg
from psycopg import sql

from capstone.index_build import DISTANCE_OPERATORS
from capstone.search import SNIPPET_CHARS, Hit, SearchTarget, hits_from_rows

__all__ = ["exact_neighbours"]

_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_BLOCK_ROWS = 4096  # ~6 MB of 384-d vectors per block: the worker's memory stays flat


def exact_neighbours(
    conn: psycopg.Connection,
    target: SearchTarget,
    queries: Sequence[np.ndarray],
    limit: int,
    *,
    margin: int = 10,
) -> list[list[Hit]]:
    """The ``limit`` nearest rows of each query, as ``ORDER BY embedding <op> query LIMIT n`` ranks them.

    ``conn`` must have pgvector's types registered (``register_vector``) and not be inside a
    transaction; it is left as it was.
    """
    if not queries:
        return []
    matrix = np.stack([np.asarray(query, dtype=np.float32) for query in queries])
    keep = limit + margin
    isolation = conn.isolation_level
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            candidates = _nearest_tids(conn, target, matrix, keep)
            return [
                _ranked(conn, target, query, tids, limit)
                for query, tids in zip(matrix, candidates, strict=True)
            ]
    finally:
        conn.isolation_level = isolation


def _nearest_tids(
    conn: psycopg.Connection, target: SearchTarget, queries: np.ndarray, keep: int
) -> list[list[str]]:
    """Per query, the ``ctid`` s of the ``keep`` rows nearest to it by numpy's distances."""
    best_distances = np.empty((len(queries), 0), dtype=np.float32)
    best_tids = np.empty((len(queries), 0), dtype=np.int64)
    for tids, vectors in _scan(conn, target):
        distances = _distances(queries, vectors, target.metric)
        merged_distances = np.concatenate([best_distances, distances], axis=1)
        merged_tids = np.concatenate([best_tids, np.broadcast_to(tids, distances.shape)], axis=1)
        if merged_distances.shape[1] > keep:
            nearest = np.argpartition(merged_distances, keep - 1, axis=1)[:, :keep]
            merged_distances = np.take_along_axis(merged_distances, nearest, axis=1)
            merged_tids = np.take_along_axis(merged_tids, nearest, axis=1)
        best_distances, best_tids = merged_distances, merged_tids
    return [[f"({tid >> 16},{tid & 0xFFFF})" for tid in row] for row in best_tids.tolist()]


def _scan(conn: psycopg.Connection, target: SearchTarget) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every stored vector, in blocks: (ctid as block << 16 | offset, float32 matrix)."""
    dimension = target.table.dimension
    record = np.dtype(
        [
            ("fields", ">i2"),
            ("tid_length", ">i4"),
            ("block", ">u4"),
            ("offset", ">u2"),
            ("vector_length", ">i4"),
            ("dimension", ">i2"),
            ("unused", ">i2"),
            ("vector", ">f4", (dimension,)),
        ]
    )
    statement = sql.SQL(
        "COPY (SELECT ctid, {column}{as_vector} FROM {table} WHERE {column} IS NOT NULL)"
        " TO STDOUT (FORMAT BINARY)"
    ).format(
        column=sql.Identifier("embedding"),
        # halfvec values stream as vector: the 4-byte floats the reader expects, the same numbers
        as_vector=sql.SQL("::vector") if target.table.vector_type == "halfvec" else sql.SQL(""),
        table=target.table.ident,
    )
    pending = bytearray()
    header_read = False
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for data in copy:
            pending += data
            if not header_read:
                if len(pending) < 19:
                    continue
                pending = pending[_header_length(pending) :]
                header_read = True
            whole = len(pending) // record.itemsize
            if whole >= _BLOCK_ROWS:
                yield _records(pending[: whole * record.itemsize], record, dimension)
                del pending[: whole * record.itemsize]
    whole = (len(pending) - 2) // record.itemsize  # the COPY ends with a 2-byte trailer (-1)
    if whole * record.itemsize + 2 != len(pending) or pending[-2:] != b"\xff\xff":
        raise ValueError(f"the vector stream of {target.table.qualified} ended mid-record")
    if whole:
        yield _records(pending[: whole * record.itemsize], record, dimension)


def _header_length(data: bytearray) -> int:
    if bytes(data[:11]) != _COPY_SIGNATURE:
        raise ValueError("not a binary COPY stream")
    extension = int.from_bytes(data[15:19], "big")
    return 19 + extension


def _records(data: bytearray, record: np.dtype, dimension: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.frombuffer(data, dtype=record)
    if not (
        np.all(rows["fields"] == 2)
        and np.all(rows["tid_length"] == 6)
        and np.all(rows["vector_length"] == 4 + 4 * dimension)
        and np.all(rows["dimension"] == dimension)
    ):
        raise ValueError(f"the vector stream does not hold (ctid, vector({dimension})) records")
    tids = (rows["block"].astype(np.int64) << 16) | rows["offset"].astype(np.int64)
    return tids, rows["vector"].astype(np.float32)


def _distances(queries: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """(queries x rows) distances as pgvector's operator for ``metric`` defines them."""
    products = queries @ vectors.T
    if metric == "inner_product":
        return -products
    row_norms = np.einsum("ij,ij->i", vectors, vectors)
    query_norms = np.einsum("ij,ij->i", queries, queries)
    if metric == "l2":
        return np.sqrt(np.maximum(query_norms[:, None] + row_norms[None, :] - 2 * products, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = 1 - products / np.sqrt(query_norms[:, None] * row_norms[None, :])
    return np.where(np.isfinite(cosine), cosine, np.inf).astype(np.float32)


def _ranked(
    conn: psycopg.Connection, target: SearchTarget, query: np.ndarray, tids: list[str], limit: int
) -> list[Hit]:
    """The candidates ranked by pgvector's distance, read by ``ctid`` (a TID scan: no index, no scan).

    The ordering is done here, not with ``ORDER BY embedding <op> query``: that would let the
    planner answer through the ANN index, the very thing being checked.
    """
    operator = sql.SQL(DISTANCE_OPERATORS[target.metric])  # from a fixed table of pgvector operators
    statement = sql.SQL(
        "SELECT id, document_id, chunk_index, embedding {op} %(query)s{cast}, left(content, {snippet})"
        " FROM {table} WHERE ctid = ANY(%(tids)s::tid[])"
    ).format(
        op=operator, cast=target.table.cast, snippet=sql.Literal(SNIPPET_CHARS), table=target.table.ident
    )
    rows = conn.execute(statement, {"query": query, "tids": tids}).fetchall()
    rows.sort(key=lambda row: (float(row[3]), row[0]))
    return hits_from_rows(rows[:limit], target.metric)

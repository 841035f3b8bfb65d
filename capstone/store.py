"""The pgvector store: one table per collection, plus the staging tables runs pass data through.

Bulk data never goes through XCom. A run is identified by its ``run_key``; its chunk texts go to
``capstone.staged_chunks``, its vectors to ``capstone.staged_vectors`` (binary COPY), and
:func:`merge_batch` moves them into the collection table with ``INSERT ... SELECT ... ON
CONFLICT DO UPDATE``, one transaction per batch. Every step can be re-run: staging writes replace
what the same run wrote before, and the merge is an upsert.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from capstone.documents import EnrichedDocument

__all__ = [
    "STAGING_SCHEMA",
    "CollectionTable",
    "DimensionMismatch",
    "assign_batches",
    "chunk_id",
    "count_lost_chunks",
    "delete_lost_chunks",
    "drop_run_staging",
    "ensure_collection_table",
    "ensure_staging",
    "merge_batch",
    "read_batch_texts",
    "stage_documents",
    "staged_vector_ids",
    "write_batch_vectors",
]

log = logging.getLogger(__name__)

STAGING_SCHEMA = "capstone"
_STAGING_LOCK = 7_245_021_113  # advisory lock serialising DDL of the shared staging tables


class DimensionMismatch(ValueError):
    """The collection table stores vectors of another dimension than the configured model."""


@dataclass(frozen=True)
class CollectionTable:
    """A collection's table: ``schema.table`` with vectors of ``dimension``."""

    schema: str
    table: str
    dimension: int

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


def chunk_id(document_id: str, chunk_index: int) -> str:
    """The id of a chunk: ``<document_id>_chunk_<i>``."""
    return f"{document_id}_chunk_{chunk_index}"


# -- DDL ------------------------------------------------------------------------------------


def ensure_staging(conn: psycopg.Connection) -> None:
    """Create the shared staging schema and tables if missing (safe under concurrency)."""
    # Checked first without DDL: CREATE ... IF NOT EXISTS still locks the table, and would queue
    # behind every run that is writing to staging.
    if _staging_exists(conn):
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_STAGING_LOCK,))
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(STAGING_SCHEMA)))
        for statement in _STAGING_DDL:
            conn.execute(statement)


def _staging_exists(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT to_regclass('capstone.staged_chunks') IS NOT NULL"
        " AND to_regclass('capstone.staged_chunks_batch') IS NOT NULL"
        " AND to_regclass('capstone.staged_documents') IS NOT NULL"
        " AND to_regclass('capstone.staged_vectors') IS NOT NULL"
    ).fetchone()
    return bool(row and row[0])


_STAGING_DDL = [
    sql.SQL(
        "CREATE TABLE IF NOT EXISTS capstone.staged_chunks ("
        " run_key text NOT NULL, collection text NOT NULL, id text NOT NULL,"
        " document_id text NOT NULL, chunk_index int NOT NULL, content text NOT NULL,"
        " metadata jsonb NOT NULL, content_hash text, batch_no int,"
        " created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run_key, id))"
    ),
    sql.SQL("CREATE INDEX IF NOT EXISTS staged_chunks_batch ON capstone.staged_chunks (run_key, batch_no)"),
    sql.SQL(
        "CREATE TABLE IF NOT EXISTS capstone.staged_documents ("
        " run_key text NOT NULL, collection text NOT NULL, document_id text NOT NULL,"
        " chunk_count int NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (run_key, document_id))"
    ),
    sql.SQL(
        "CREATE TABLE IF NOT EXISTS capstone.staged_vectors ("
        " run_key text NOT NULL, id text NOT NULL, embedding vector NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run_key, id))"
    ),
]


def ensure_collection_table(conn: psycopg.Connection, table: CollectionTable) -> None:
    """Create the collection table if missing; fail fast if it holds another dimension."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (table.qualified,))
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.schema)))
        existing = stored_dimension(conn, table)
        if existing is not None and existing != table.dimension:
            raise DimensionMismatch(
                f"table {table.qualified} stores vectors of dimension {existing} but the collection's "
                f"embedding model produces {table.dimension}: set embedding.dimension to {existing}, "
                "or point store.table at a new table (re-indexing everything)"
            )
        if existing is None:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " id text PRIMARY KEY, document_id text NOT NULL, chunk_index int NOT NULL,"
                    " content text NOT NULL, metadata jsonb NOT NULL DEFAULT '{{}}',"
                    " content_hash text NOT NULL, embedding vector({}),"
                    " embedding_model text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
                ).format(table.ident, sql.Literal(table.dimension))
            )
            conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (document_id)").format(
                    sql.Identifier(f"{table.table[:50]}_document_id"), table.ident
                )
            )


def stored_dimension(conn: psycopg.Connection, table: CollectionTable) -> int | None:
    """Dimension of the table's ``embedding`` column, or None when the table does not exist."""
    row = conn.execute(
        "SELECT a.atttypmod FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attname = 'embedding' AND NOT a.attisdropped",
        (table.schema, table.table),
    ).fetchone()
    return None if row is None else int(row[0])


# -- staging a run's documents --------------------------------------------------------------


def stage_documents(
    conn: psycopg.Connection, run_key: str, collection: str, documents: Iterable[EnrichedDocument]
) -> tuple[int, int]:
    """Replace the run's staged documents and chunks with ``documents``; returns (docs, chunks)."""
    document_count = chunk_count = 0
    with conn.transaction():
        _drop_run_rows(conn, run_key)
        with conn.cursor() as cur:
            doc_rows: list[tuple[str, str, str, int]] = []
            with cur.copy(
                "COPY capstone.staged_chunks (run_key, collection, id, document_id, chunk_index, content,"
                " metadata) FROM STDIN"
            ) as copy:
                for document in documents:
                    metadata = json.dumps(document.metadata, ensure_ascii=False)
                    for index, text in enumerate(document.chunks):
                        copy.write_row(
                            (
                                run_key,
                                collection,
                                chunk_id(document.id, index),
                                document.id,
                                index,
                                text,
                                metadata,
                            )
                        )
                    doc_rows.append((run_key, collection, document.id, len(document.chunks)))
                    document_count += 1
                    chunk_count += len(document.chunks)
            with cur.copy(
                "COPY capstone.staged_documents (run_key, collection, document_id, chunk_count) FROM STDIN"
            ) as copy:
                for row in doc_rows:
                    copy.write_row(row)
    # Fresh statistics: without them the planner takes a big batch for an empty table and joins
    # it to the collection with nested loops (minutes instead of milliseconds at 20k chunks).
    conn.execute("ANALYZE capstone.staged_chunks, capstone.staged_documents")
    return document_count, chunk_count


def drop_run_staging(conn: psycopg.Connection, run_key: str) -> None:
    """Remove everything the run staged."""
    with conn.transaction():
        _drop_run_rows(conn, run_key)


def _drop_run_rows(conn: psycopg.Connection, run_key: str) -> None:
    for name in ("staged_chunks", "staged_documents", "staged_vectors"):
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE run_key = %s").format(sql.Identifier(STAGING_SCHEMA, name)),
            (run_key,),
        )


def drop_stale_staging(conn: psycopg.Connection, collection: str, older_than_days: int = 7) -> int:
    """Remove what crashed or abandoned runs of ``collection`` left behind; returns rows removed."""
    with conn.transaction():
        stale = [
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT run_key FROM capstone.staged_documents"
                " WHERE collection = %s AND created_at < now() - make_interval(days => %s)",
                (collection, older_than_days),
            )
        ]
        for run_key in stale:
            _drop_run_rows(conn, run_key)
    return len(stale)


# -- deciding what to embed -----------------------------------------------------------------


def assign_batches(
    conn: psycopg.Connection,
    run_key: str,
    table: CollectionTable,
    model: str,
    batch_size: int,
    max_batches: int,
) -> list[dict[str, int]]:
    """Hash the run's chunks, keep those new or changed, and number them into batches.

    The hash is sha256 over (text, metadata, model): a chunk whose hash is already stored with an
    embedding is skipped. Batches grow beyond ``batch_size`` when needed so that there are never
    more than ``max_batches`` (Airflow's ``max_map_length``). Returns ``[{"batch_no", "chunks"}]``.
    """
    with conn.transaction():
        conn.execute(
            "UPDATE capstone.staged_chunks SET batch_no = NULL, content_hash = encode(sha256(convert_to("
            " jsonb_build_array(content, metadata, %s::text)::text, 'UTF8')), 'hex') WHERE run_key = %s",
            (model, run_key),
        )
        todo = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM capstone.staged_chunks s LEFT JOIN {} t ON t.id = s.id"
                " WHERE s.run_key = %s AND (t.id IS NULL OR t.embedding IS NULL"
                " OR t.content_hash IS DISTINCT FROM s.content_hash)"
            ).format(table.ident),
            (run_key,),
        ).fetchone()[0]  # type: ignore[index]
        if todo == 0:
            return []
        size = max(batch_size, math.ceil(todo / max_batches))
        conn.execute(
            sql.SQL(
                "WITH todo AS ("
                " SELECT s.id, (row_number() OVER (ORDER BY s.id) - 1) / %s AS batch_no"
                " FROM capstone.staged_chunks s LEFT JOIN {} t ON t.id = s.id"
                " WHERE s.run_key = %s AND (t.id IS NULL OR t.embedding IS NULL"
                " OR t.content_hash IS DISTINCT FROM s.content_hash))"
                " UPDATE capstone.staged_chunks s SET batch_no = todo.batch_no FROM todo"
                " WHERE s.run_key = %s AND s.id = todo.id"
            ).format(table.ident),
            (size, run_key, run_key),
        )
        rows = conn.execute(
            "SELECT batch_no, count(*) FROM capstone.staged_chunks"
            " WHERE run_key = %s AND batch_no IS NOT NULL GROUP BY batch_no ORDER BY batch_no",
            (run_key,),
        ).fetchall()
    return [{"batch_no": int(batch_no), "chunks": int(count)} for batch_no, count in rows]


def count_lost_chunks(conn: psycopg.Connection, run_key: str, table: CollectionTable) -> int:
    """Stored chunks of the run's documents that the new versions of those documents no longer have."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {} t JOIN capstone.staged_documents d"
            " ON d.document_id = t.document_id AND d.run_key = %s WHERE t.chunk_index >= d.chunk_count"
        ).format(table.ident),
        (run_key,),
    ).fetchone()
    return int(row[0]) if row else 0


# -- embedding batches ----------------------------------------------------------------------


def read_batch_texts(conn: psycopg.Connection, run_key: str, batch_no: int) -> tuple[list[str], list[str]]:
    """The (ids, texts) of one batch, in id order."""
    rows = conn.execute(
        "SELECT id, content FROM capstone.staged_chunks WHERE run_key = %s AND batch_no = %s ORDER BY id",
        (run_key, batch_no),
    ).fetchall()
    return [row[0] for row in rows], [row[1] for row in rows]


def write_batch_vectors(
    conn: psycopg.Connection, run_key: str, ids: Sequence[str], vectors: np.ndarray
) -> None:
    """Replace the staged vectors of ``ids`` with ``vectors`` (binary COPY, one transaction)."""
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
    matrix = np.ascontiguousarray(vectors, dtype=">f4")
    dim = matrix.shape[1] if matrix.ndim == 2 else 0
    header = np.array([dim, 0], dtype=">i2").tobytes()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "DELETE FROM capstone.staged_vectors WHERE run_key = %s AND id = ANY(%s)", (run_key, list(ids))
        )
        with cur.copy(
            "COPY capstone.staged_vectors (run_key, id, embedding) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "text", "bytea"])
            for chunk, row in zip(ids, matrix, strict=True):
                copy.write_row((run_key, chunk, header + row.tobytes()))


def staged_vector_ids(conn: psycopg.Connection, run_key: str) -> list[str]:
    """Ids of the chunks with a staged vector, in order."""
    return [
        row[0]
        for row in conn.execute(
            "SELECT id FROM capstone.staged_vectors WHERE run_key = %s ORDER BY id", (run_key,)
        )
    ]


# -- merging into the collection ------------------------------------------------------------


def analyze_staged_vectors(conn: psycopg.Connection) -> None:
    """Refresh the planner's statistics of the staged vectors before merging them."""
    conn.execute("ANALYZE capstone.staged_vectors")


def merge_batch(
    conn: psycopg.Connection, run_key: str, table: CollectionTable, model: str, first_id: str, last_id: str
) -> int:
    """Upsert the staged chunks with ids in ``[first_id, last_id]`` into the table; one transaction."""
    with conn.transaction():
        cursor = conn.execute(
            sql.SQL(
                "INSERT INTO {} AS t (id, document_id, chunk_index, content, metadata, content_hash,"
                " embedding, embedding_model, updated_at)"
                " SELECT c.id, c.document_id, c.chunk_index, c.content, c.metadata, c.content_hash,"
                " v.embedding, %s, clock_timestamp()"
                " FROM capstone.staged_vectors v JOIN capstone.staged_chunks c"
                " ON c.run_key = v.run_key AND c.id = v.id"
                " WHERE v.run_key = %s AND v.id >= %s AND v.id <= %s"
                " ON CONFLICT (id) DO UPDATE SET document_id = EXCLUDED.document_id,"
                " chunk_index = EXCLUDED.chunk_index, content = EXCLUDED.content,"
                " metadata = EXCLUDED.metadata, content_hash = EXCLUDED.content_hash,"
                " embedding = EXCLUDED.embedding, embedding_model = EXCLUDED.embedding_model,"
                " updated_at = EXCLUDED.updated_at"
            ).format(table.ident),
            (model, run_key, first_id, last_id),
        )
        return cursor.rowcount


def delete_lost_chunks(conn: psycopg.Connection, run_key: str, table: CollectionTable) -> int:
    """Delete stored chunks that re-indexed documents no longer have; returns rows deleted."""
    with conn.transaction():
        cursor = conn.execute(
            sql.SQL(
                "DELETE FROM {} t USING capstone.staged_documents d"
                " WHERE d.run_key = %s AND d.document_id = t.document_id AND t.chunk_index >= d.chunk_count"
            ).format(table.ident),
            (run_key,),
        )
        return cursor.rowcount


def count_vectors(conn: psycopg.Connection, table: CollectionTable) -> int:
    """Rows of the collection that have an embedding."""
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE embedding IS NOT NULL").format(table.ident)
    ).fetchone()
    return int(row[0]) if row else 0

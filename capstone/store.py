"""The pgvector store: one table per collection, plus the staging tables runs pass data through.

Bulk data never goes through XCom. A run is identified by its ``run_key``; its chunk texts go to
``capstone.staged_chunks``, its vectors to ``capstone.staged_vectors`` (binary COPY), and
:func:`merge_batch` moves them into the collection table with ``INSERT ... SELECT ... ON
CONFLICT DO UPDATE``, one transaction per batch. Every step can be re-run: staging writes replace
what the same run wrote before, and the merge is an upsert.
"""

from __future__ import annotations

import hashlib
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
    "StagingIncomplete",
    "assign_batches",
    "batch_spans",
    "chunk_id",
    "count_lost_chunks",
    "count_staged_vectors",
    "delete_lost_chunks",
    "drop_run_staging",
    "ensure_collection_table",
    "ensure_staging",
    "merge_batch",
    "merge_spans",
    "read_batch_texts",
    "stage_documents",
    "write_batch_vectors",
]

log = logging.getLogger(__name__)

STAGING_SCHEMA = "capstone"
_STAGING_LOCK = 7_245_021_113  # advisory lock serialising DDL of the shared staging tables


class StagingIncomplete(RuntimeError):
    """Fewer staged rows than the run embedded: Postgres crashed and emptied the unlogged staging."""


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


def content_hash(text: str, metadata_json: str, model: str) -> str:
    """sha256 over (text, metadata, model): a chunk whose hash is stored needs no new embedding."""
    return hashlib.sha256("\x1f".join((text, metadata_json, model)).encode("utf-8")).hexdigest()


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
        " AND to_regclass('capstone.staged_documents') IS NOT NULL"
        " AND to_regclass('capstone.staged_vectors') IS NOT NULL"
        " AND to_regclass('capstone.staged_batches') IS NOT NULL"
    ).fetchone()
    return bool(row and row[0])


# Staging is UNLOGGED: it is rebuilt from the batch by re-running the DAG, and skipping the WAL
# halves the cost of writing every vector twice. A crash empties unlogged tables; the merge
# notices (fewer rows than staged) and fails with a clear message instead of losing chunks.
_STAGING_DDL = [
    sql.SQL(
        "CREATE UNLOGGED TABLE IF NOT EXISTS capstone.staged_chunks ("
        " run_key text NOT NULL, collection text NOT NULL, id text NOT NULL,"
        " document_id text NOT NULL, chunk_index int NOT NULL, content text NOT NULL,"
        " metadata jsonb NOT NULL, content_hash text NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run_key, id))"
    ),
    sql.SQL(
        "CREATE UNLOGGED TABLE IF NOT EXISTS capstone.staged_documents ("
        " run_key text NOT NULL, collection text NOT NULL, document_id text NOT NULL,"
        " chunk_count int NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (run_key, document_id))"
    ),
    sql.SQL(
        "CREATE UNLOGGED TABLE IF NOT EXISTS capstone.staged_batches ("
        " run_key text NOT NULL, batch_no int NOT NULL, first_id text NOT NULL,"
        " last_id text NOT NULL, chunks int NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (run_key, batch_no))"
    ),
    sql.SQL(
        "CREATE UNLOGGED TABLE IF NOT EXISTS capstone.staged_vectors ("
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
    conn: psycopg.Connection,
    run_key: str,
    collection: str,
    documents: Iterable[EnrichedDocument],
    model: str,
) -> tuple[int, int]:
    """Replace the run's staged documents and chunks with ``documents``; returns (docs, chunks).

    Each chunk is staged with its content hash for ``model`` (see :func:`content_hash`).
    """
    document_count = chunk_count = 0
    with conn.transaction():
        _drop_run_rows(conn, run_key)
        with conn.cursor() as cur:
            doc_rows: list[tuple[str, str, str, int]] = []
            with cur.copy(
                "COPY capstone.staged_chunks (run_key, collection, id, document_id, chunk_index, content,"
                " metadata, content_hash) FROM STDIN"
            ) as copy:
                for document in documents:
                    metadata = json.dumps(document.metadata, ensure_ascii=False, sort_keys=True)
                    for index, text in enumerate(document.chunks):
                        row_hash = content_hash(text, metadata, model)
                        row_id = chunk_id(document.id, index)
                        copy.write_row(
                            (run_key, collection, row_id, document.id, index, text, metadata, row_hash)
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
    for name in ("staged_chunks", "staged_documents", "staged_batches", "staged_vectors"):
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


_CHANGED = (
    "FROM capstone.staged_chunks s LEFT JOIN {table} t ON t.id = s.id"
    " WHERE s.run_key = %s AND (t.id IS NULL OR t.embedding IS NULL OR t.content_hash <> s.content_hash)"
)


def changed_chunk_ids(conn: psycopg.Connection, run_key: str, table: CollectionTable) -> list[str]:
    """Ids of the run's staged chunks that are new, changed, or stored without an embedding, in order."""
    query = sql.SQL("SELECT s.id " + _CHANGED + " ORDER BY s.id").format(table=table.ident)
    return [row[0] for row in conn.execute(query, (run_key,))]


def assign_batches(
    conn: psycopg.Connection,
    run_key: str,
    table: CollectionTable,
    batch_size: int,
    max_batches: int,
) -> list[dict[str, int]]:
    """Cut the run's new or changed chunks into batches for mapping: ``[{"batch_no", "chunks"}]``.

    A chunk whose hash is already stored with an embedding is skipped. Batches grow beyond
    ``batch_size`` when needed so that there are never more than ``max_batches`` (Airflow's
    ``max_map_length``). Each batch is an id range kept in ``capstone.staged_batches``, so the
    descriptors that go through XCom stay tiny whatever the size of the run.
    """
    ids = changed_chunk_ids(conn, run_key, table)
    size = max(batch_size, math.ceil(len(ids) / max_batches)) if ids else batch_size
    rows = [
        (run_key, number, ids[start], ids[min(start + size, len(ids)) - 1], min(size, len(ids) - start))
        for number, start in enumerate(range(0, len(ids), size))
    ]
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("DELETE FROM capstone.staged_batches WHERE run_key = %s", (run_key,))
        with cur.copy(
            "COPY capstone.staged_batches (run_key, batch_no, first_id, last_id, chunks) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
    return [{"batch_no": number, "chunks": chunks} for _key, number, _first, _last, chunks in rows]


def batch_spans(conn: psycopg.Connection, run_key: str) -> list[tuple[int, str, str, int]]:
    """The run's embedding batches: ``[(batch_no, first_id, last_id, chunks)]`` in id order."""
    rows = conn.execute(
        "SELECT batch_no, first_id, last_id, chunks FROM capstone.staged_batches"
        " WHERE run_key = %s ORDER BY batch_no",
        (run_key,),
    ).fetchall()
    return [(int(n), str(first), str(last), int(chunks)) for n, first, last, chunks in rows]


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


def read_batch_texts(
    conn: psycopg.Connection, run_key: str, table: CollectionTable, batch_no: int
) -> tuple[list[str], list[str]]:
    """The (ids, texts) of the new or changed chunks of one batch, in id order."""
    span = conn.execute(
        "SELECT first_id, last_id FROM capstone.staged_batches WHERE run_key = %s AND batch_no = %s",
        (run_key, batch_no),
    ).fetchone()
    if span is None:
        return [], []
    query = sql.SQL("SELECT s.id, s.content " + _CHANGED + " AND s.id >= %s AND s.id <= %s ORDER BY s.id")
    rows = conn.execute(query.format(table=table.ident), (run_key, span[0], span[1])).fetchall()
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


def count_staged_vectors(conn: psycopg.Connection, run_key: str) -> int:
    """How many vectors the run has staged."""
    row = conn.execute(
        "SELECT count(*) FROM capstone.staged_vectors WHERE run_key = %s", (run_key,)
    ).fetchone()
    return int(row[0]) if row else 0


def merge_spans(conn: psycopg.Connection, run_key: str, span_size: int) -> list[tuple[str, str, int]]:
    """Id ranges of about ``span_size`` staged vectors each: ``[(first_id, last_id, count)]``.

    Consecutive embedding batches are grouped; a batch larger than ``span_size`` is split.
    """
    spans: list[tuple[str, str, int]] = []
    for _number, first, last, chunks in batch_spans(conn, run_key):
        if chunks > span_size:
            spans += _split_range(conn, run_key, first, last, span_size)
        elif spans and spans[-1][2] + chunks <= span_size:
            spans[-1] = (spans[-1][0], last, spans[-1][2] + chunks)
        else:
            spans.append((first, last, chunks))
    return spans


def _split_range(
    conn: psycopg.Connection, run_key: str, first: str, last: str, span_size: int
) -> list[tuple[str, str, int]]:
    ids = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM capstone.staged_vectors WHERE run_key = %s AND id >= %s AND id <= %s ORDER BY id",
            (run_key, first, last),
        )
    ]
    return [
        (ids[i], ids[min(i + span_size, len(ids)) - 1], len(ids[i : i + span_size]))
        for i in range(0, len(ids), span_size)
    ]


# -- merging into the collection ------------------------------------------------------------


def analyze_staged_vectors(conn: psycopg.Connection) -> None:
    """Refresh the planner's statistics of the staged vectors before merging them."""
    conn.execute("ANALYZE capstone.staged_vectors")


def merge_batch(
    conn: psycopg.Connection,
    run_key: str,
    table: CollectionTable,
    model: str,
    first_id: str,
    last_id: str,
    expected: int | None = None,
) -> int:
    """Upsert the staged chunks with ids in ``[first_id, last_id]`` into the table; one transaction.

    With ``expected``, a merge of fewer rows (staged chunk texts gone) is rolled back and raises
    :class:`StagingIncomplete`.
    """
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
                " AND c.run_key = %s AND c.id >= %s AND c.id <= %s"
                " ON CONFLICT (id) DO UPDATE SET document_id = EXCLUDED.document_id,"
                " chunk_index = EXCLUDED.chunk_index, content = EXCLUDED.content,"
                " metadata = EXCLUDED.metadata, content_hash = EXCLUDED.content_hash,"
                " embedding = EXCLUDED.embedding, embedding_model = EXCLUDED.embedding_model,"
                " updated_at = EXCLUDED.updated_at"
            ).format(table.ident),
            (model, run_key, first_id, last_id, run_key, first_id, last_id),
        )
        if expected is not None and cursor.rowcount != expected:
            raise StagingIncomplete(
                f"merging {first_id}..{last_id} wrote {cursor.rowcount} rows where {expected} vectors were "
                "staged: the staged chunk texts are gone (did Postgres crash?); rolled back, re-run the DAG"
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

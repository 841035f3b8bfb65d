"""The pgvector store: a collection's version tables (one per embedding, behind the view
consumers query, see :mod:`capstone.versions`), plus the staging tables runs pass data through.

Bulk data never goes through XCom. A run, identified by its ``run_key``, gets its own UNLOGGED
staging tables ``capstone."run_<run_key>_{chunks,documents,batches,vectors}"`` (see
:func:`run_table`): chunk texts are copied into the first, vectors into the last (binary COPY),
and :func:`merge_batch` moves them into the collection table with ``INSERT ... SELECT ... ON
CONFLICT DO UPDATE``, one transaction per batch; the tables are then dropped. Every step can be
re-run: staging writes replace what the same run wrote before, and the merge is an upsert.

The collection table also has ``content_tsv``, a stored generated ``tsvector`` of the chunk text
in the collection's text search configuration, which the keyword index (GIN, built by the
trigger beside the ANN index) holds. Tables created before it existed get it on their next run
(:func:`ensure_collection_table`), as does a table whose configuration changed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from capstone.contracts import BatchDescriptor
from capstone.documents import EnrichedDocument
from capstone.errors import TerminalError
from capstone.settings import TEXT_SEARCH_COLUMN, VectorType

__all__ = [
    "STAGING_KINDS",
    "STAGING_SCHEMA",
    "TEXT_SEARCH_COLUMN",
    "CollectionTable",
    "DimensionMismatch",
    "KeywordColumnConflict",
    "StagingIncomplete",
    "VectorTypeMismatch",
    "assign_batches",
    "batch_spans",
    "chunk_id",
    "count_batch_staged",
    "count_lost_chunks",
    "count_staged_chunks",
    "count_staged_vectors",
    "delete_lost_chunks",
    "delete_unstaged",
    "drop_run_staging",
    "drop_stale_staging",
    "ensure_collection_table",
    "ensure_staging",
    "index_is_valid",
    "merge_batch",
    "merge_spans",
    "pending_batch_texts",
    "record_batch_embedded",
    "run_staging_exists",
    "run_table",
    "seed_from",
    "stage_documents",
    "staged_vector_ids",
    "stored_text_config",
    "stored_vector",
    "stored_vector_type",
    "write_batch_vectors",
]

log = logging.getLogger(__name__)

STAGING_SCHEMA = "capstone"
_STAGING_LOCK = 7_245_021_113  # advisory lock serialising the creation of the staging registry


class StagingIncomplete(TerminalError, RuntimeError):
    """Fewer staged rows than the run embedded: Postgres crashed and emptied the unlogged staging.

    Terminal for the task: only a re-run from ``load_enriched_documents`` stages them again.
    """


class DimensionMismatch(TerminalError, ValueError):
    """The collection table stores vectors of another dimension than the configured model."""


class VectorTypeMismatch(TerminalError, ValueError):
    """The collection table stores vectors of another type than ``store.vector_type`` says."""


class KeywordColumnConflict(TerminalError, ValueError):
    """The table's ``content_tsv`` is not the generated column capstone creates, or the text search
    configuration the spec names does not exist."""


# How long adding (or re-configuring) the keyword column of an existing table waits for its lock
# before giving up (the task retries): an ALTER queued behind a long query blocks readers too.
KEYWORD_COLUMN_LOCK_TIMEOUT = "30s"
_GENERATED_TSVECTOR = re.compile(r"to_tsvector\('((?:[^']|'')+)'::regconfig, content\)")


@dataclass(frozen=True)
class CollectionTable:
    """A collection's table: ``schema.table`` with vectors of ``dimension`` in a column of
    ``vector_type`` (``vector`` or ``halfvec``) and a keyword column parsed with the text search
    configuration ``text_config``."""

    schema: str
    table: str
    dimension: int
    text_config: str
    vector_type: VectorType

    @property
    def cast(self) -> sql.Composable:
        """``::halfvec`` for a halfvec table (a query vector, a staged vector), else nothing."""
        return sql.SQL("::halfvec") if self.vector_type == "halfvec" else sql.SQL("")

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


def chunk_id(document_id: str, chunk_index: int) -> str:
    """The id of a chunk: ``<document_id>_chunk_<i>``."""
    return f"{document_id}_chunk_{chunk_index}"


def content_hash(text: str, metadata_json: str, hash_key: str) -> str:
    """sha256 over (text, metadata, the version's hash key): a chunk whose hash is stored needs no new
    embedding. The key is the embedding fingerprint of the collection version the chunk goes to
    (:mod:`capstone.versions`), or the model name for versions adopted from earlier releases, which
    hashed over it."""
    return hashlib.sha256("\x1f".join((text, metadata_json, hash_key)).encode("utf-8")).hexdigest()


# -- DDL ------------------------------------------------------------------------------------

# Staging is per run: four UNLOGGED tables ``capstone."run_<run_key>_<kind>"`` that the load task
# creates (dropping what an earlier attempt left) and the store stage drops once every batch is
# in, O(1) whatever the size of the run. Unlogged: they are rebuilt by re-running the DAG, and
# skipping the WAL halves the cost of writing every vector twice. A crash empties unlogged tables
# (they stay, empty); the store stage notices (fewer rows than embedded) and fails with a clear
# message instead of losing chunks. ``capstone.staging_runs`` (logged) lists the runs that have
# staging tables, so that the tables of abandoned runs can be found and dropped.
STAGING_KINDS = ("chunks", "documents", "batches", "vectors")
_MAX_KEY_IN_NAME = 40  # "run_" + key + "_documents" stays within Postgres's 63-byte identifiers

_RUN_TABLE_DDL = {
    "chunks": "CREATE UNLOGGED TABLE {} (id text NOT NULL, document_id text NOT NULL,"
    " chunk_index int NOT NULL, content text NOT NULL, metadata jsonb NOT NULL,"
    " content_hash text NOT NULL)",
    "documents": "CREATE UNLOGGED TABLE {} (document_id text PRIMARY KEY, chunk_count int NOT NULL)",
    # new_chunks: how many of the batch's chunks the collection table did not hold at all;
    # embedded: how many vectors generate_embedding staged for it (fewer when the API refused some)
    "batches": "CREATE UNLOGGED TABLE {} (batch_no int PRIMARY KEY, first_id text NOT NULL,"
    " last_id text NOT NULL, chunks int NOT NULL, new_chunks int NOT NULL, embedded int)",
    "vectors": "CREATE UNLOGGED TABLE {} (id text PRIMARY KEY, embedding vector NOT NULL)",
}


def run_table(run_key: str, kind: str) -> sql.Identifier:
    """The staging table of ``kind`` (one of :data:`STAGING_KINDS`) of the run ``run_key``."""
    if kind not in STAGING_KINDS:
        raise ValueError(f"unknown staging table kind {kind!r}")
    key = run_key
    if len(key.encode("utf-8")) > _MAX_KEY_IN_NAME:
        key = "h" + hashlib.sha256(run_key.encode("utf-8")).hexdigest()[:32]
    return sql.Identifier(STAGING_SCHEMA, f"run_{key}_{kind}")


def ensure_staging(conn: psycopg.Connection) -> None:
    """Create the staging schema and the registry of staged runs if missing (safe under concurrency)."""
    # Checked first without DDL: CREATE ... IF NOT EXISTS still takes locks.
    row = conn.execute("SELECT to_regclass('capstone.staging_runs') IS NOT NULL").fetchone()
    if row and row[0]:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_STAGING_LOCK,))
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(STAGING_SCHEMA)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS capstone.staging_runs (run_key text PRIMARY KEY,"
            " collection text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )


def run_staging_exists(conn: psycopg.Connection, run_key: str) -> bool:
    """Whether the run's staging tables exist (they may be empty after a crash)."""
    names = [run_table(run_key, kind).as_string(conn) for kind in STAGING_KINDS]
    row = conn.execute(
        "SELECT bool_and(to_regclass(name) IS NOT NULL) FROM unnest(%s::text[]) AS name", (names,)
    ).fetchone()
    return bool(row and row[0])


def ensure_collection_table(conn: psycopg.Connection, table: CollectionTable) -> None:
    """Create the collection table if missing, or bring its keyword column up to date; fail fast if
    it holds another dimension."""
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
        stored_type = stored_vector_type(conn, table) if existing is not None else None
        if stored_type is not None and stored_type != table.vector_type:
            fix = (
                f"set store.vector_type to {stored_type}, or point store.table at a new table"
                if stored_type in ("vector", "halfvec")
                else "point store.table at a new table"
            )
            raise VectorTypeMismatch(
                f"table {table.qualified} stores its vectors as {stored_type} but the collection's "
                f"store.vector_type resolves to {table.vector_type}: {fix} (re-indexing everything)"
            )
        if existing is not None:
            _ensure_keyword_column(conn, table)
            return
        _check_text_config(conn, table.text_config)
        _check_vector_type(conn, table.vector_type)
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " id text PRIMARY KEY, document_id text NOT NULL, chunk_index int NOT NULL,"
                " content text NOT NULL, metadata jsonb NOT NULL DEFAULT '{{}}',"
                " content_hash text NOT NULL, embedding {}({}),"
                " embedding_model text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),"
                " {} tsvector GENERATED ALWAYS AS ({}) STORED)"
            ).format(
                table.ident,
                sql.SQL(table.vector_type),  # one of two type names, from the spec
                sql.Literal(table.dimension),
                sql.Identifier(TEXT_SEARCH_COLUMN),
                _tsvector_expression(table.text_config),
            )
        )
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (document_id)").format(
                sql.Identifier(f"{table.table[:50]}_document_id"), table.ident
            )
        )


def _check_vector_type(conn: psycopg.Connection, vector_type: VectorType) -> None:
    row = conn.execute("SELECT to_regtype(%s) IS NOT NULL", (vector_type,)).fetchone()
    if not (row and row[0]):
        raise VectorTypeMismatch(
            f"store.vector_type {vector_type!r} needs pgvector 0.7 or later, and this Postgres has no "
            "such type: run `alter extension vector update` (as the extension's owner), or use "
            "store.vector_type: vector"
        )


def _tsvector_expression(text_config: str) -> sql.Composed:
    return sql.SQL("to_tsvector({}::regconfig, content)").format(sql.Literal(text_config))


def stored_dimension(conn: psycopg.Connection, table: CollectionTable) -> int | None:
    """Dimension of the table's ``embedding`` column, or None when the table does not exist."""
    column = _embedding_column(conn, table)
    return None if column is None else column[1]


def stored_vector_type(conn: psycopg.Connection, table: CollectionTable) -> str | None:
    """Type of the table's ``embedding`` column (``vector``, ``halfvec``), or None without a table."""
    column = _embedding_column(conn, table)
    return None if column is None else column[0]


def _embedding_column(conn: psycopg.Connection, table: CollectionTable) -> tuple[str, int] | None:
    """(type name, typmod: the dimension) of the table's ``embedding`` column, None without one."""
    row = conn.execute(
        "SELECT format_type(a.atttypid, NULL), a.atttypmod FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attname = 'embedding' AND NOT a.attisdropped",
        (table.schema, table.table),
    ).fetchone()
    return None if row is None else (str(row[0]).rpartition(".")[2], int(row[1]))


def stored_text_config(conn: psycopg.Connection, table: CollectionTable) -> str | None:
    """The text search configuration of the table's keyword column, or None when it has none.

    Raises :class:`KeywordColumnConflict` when a ``content_tsv`` column exists that is not the
    generated column capstone creates.
    """
    row = conn.execute(
        "SELECT a.attgenerated, pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attname = %s AND NOT a.attisdropped",
        (table.schema, table.table, TEXT_SEARCH_COLUMN),
    ).fetchone()
    if row is None:
        return None
    match = _GENERATED_TSVECTOR.fullmatch(row[1] or "") if row[0] == "s" else None
    if match is None:
        raise KeywordColumnConflict(
            f"table {table.qualified} has a column {TEXT_SEARCH_COLUMN!r} that capstone did not create "
            f"({row[1] or 'not a stored generated column'}): rename or drop it, capstone adds its own"
        )
    return match.group(1).replace("''", "'")


def _ensure_keyword_column(conn: psycopg.Connection, table: CollectionTable) -> None:
    """Add the keyword column to a table from an earlier release, or re-generate it in another text
    search configuration.

    Either rewrites the table under an exclusive lock (reads wait; ~40 us per row). The table's
    ANN indexes are dropped first, or the rewrite would rebuild them under that lock (an HNSW
    build takes minutes on a large table): vector searches scan the table until the run's
    indexing step rebuilds them, concurrently, as it does any missing index.
    """
    _check_text_config(conn, table.text_config)
    stored = stored_text_config(conn, table)
    if stored is not None and _same_text_config(conn, stored, table.text_config):
        return
    rows = _estimated_rows(conn, table)
    column = sql.Identifier(TEXT_SEARCH_COLUMN)
    why = (
        "it has no keyword column (created by an earlier release)"
        if stored is None
        else f"search.text_config changed from {stored!r} to {table.text_config!r}"
    )
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (KEYWORD_COLUMN_LOCK_TIMEOUT,))
    try:
        dropped = _drop_ann_indexes(conn, table)
        log.warning(
            "table %s: %s: %s %s = to_tsvector(%r, content), rewriting its ~%d rows once under an exclusive "
            "lock%s; this run's indexing step builds the missing indexes",
            table.qualified,
            why,
            "adding" if stored is None else "re-generating",
            TEXT_SEARCH_COLUMN,
            table.text_config,
            rows,
            f" (its ANN index {', '.join(dropped)} dropped first, so the rewrite does not rebuild it)"
            if dropped
            else "",
        )
        if stored is not None:
            _regenerate_keyword_column(conn, table)
            return
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN {} tsvector GENERATED ALWAYS AS ({}) STORED").format(
                table.ident, column, _tsvector_expression(table.text_config)
            )
        )
    except psycopg.errors.LockNotAvailable as exc:
        raise RuntimeError(
            f"could not lock {table.qualified} within {KEYWORD_COLUMN_LOCK_TIMEOUT} to add its keyword "
            "column: a long query or transaction holds it; nothing was changed, retry the task"
        ) from exc


def _regenerate_keyword_column(conn: psycopg.Connection, table: CollectionTable) -> None:
    """Re-generate the keyword column in the table's text search configuration.

    PostgreSQL 17 and later change the expression in place (``SET EXPRESSION``), which keeps the
    view over a collection's live version (and views of consumers) working; older servers drop and
    add the column, which Postgres refuses while a view reads it.
    """
    column, expression = sql.Identifier(TEXT_SEARCH_COLUMN), _tsvector_expression(table.text_config)
    if conn.info.server_version >= 170000:
        conn.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET EXPRESSION AS ({})").format(
                table.ident, column, expression
            )
        )
        return
    try:
        with conn.transaction():
            conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(table.ident, column))
    except psycopg.errors.DependentObjectsStillExist as exc:
        raise KeywordColumnConflict(
            f"cannot change search.text_config of {table.qualified} on PostgreSQL "
            f"{conn.info.server_version // 10000}: views read its {TEXT_SEARCH_COLUMN} column "
            f"({exc.diag.message_detail}); PostgreSQL 17 changes it in place. Keep the old text_config, "
            "or change the embedding too (a new version of the collection is built with the new one)"
        ) from exc
    conn.execute(
        sql.SQL("ALTER TABLE {} ADD COLUMN {} tsvector GENERATED ALWAYS AS ({}) STORED").format(
            table.ident, column, expression
        )
    )


def _drop_ann_indexes(conn: psycopg.Connection, table: CollectionTable) -> list[str]:
    """Drop the table's capstone-managed HNSW/IVFFlat indexes; returns their names."""
    from capstone.index_build import is_managed_index_name  # index_build imports this module

    rows = conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_am am ON am.oid = c.relam JOIN pg_class t ON t.oid = i.indrelid"
        " JOIN pg_namespace n ON n.oid = t.relnamespace"
        " WHERE n.nspname = %s AND t.relname = %s AND am.amname IN ('hnsw', 'ivfflat')",
        (table.schema, table.table),
    ).fetchall()
    names = [name for (name,) in rows if is_managed_index_name(name, table.table)]
    for name in names:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(table.schema, name)))
    return names


def index_is_valid(conn: psycopg.Connection, schema: str, name: str) -> bool:
    """Whether index ``schema.name`` exists and is valid (usable by queries)."""
    row = conn.execute(
        "SELECT i.indisvalid AND i.indisready FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).fetchone()
    return bool(row and row[0])


def _same_text_config(conn: psycopg.Connection, stored: str, wanted: str) -> bool:
    if stored == wanted:
        return True
    row = conn.execute("SELECT %s::regconfig = %s::regconfig", (stored, wanted)).fetchone()
    return bool(row and row[0])


def _check_text_config(conn: psycopg.Connection, text_config: str) -> None:
    schema, _, name = text_config.rpartition(".")
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_ts_config c JOIN pg_namespace n ON n.oid = c.cfgnamespace"
        " WHERE c.cfgname = %s AND (n.nspname = %s OR (%s = '' AND pg_ts_config_is_visible(c.oid)))),"
        " (SELECT string_agg(cfgname, ', ' ORDER BY cfgname) FROM pg_ts_config)",
        (name, schema, schema),
    ).fetchone()
    if row is None or not row[0]:
        raise KeywordColumnConflict(
            f"search.text_config {text_config!r} is not a text search configuration of this Postgres; "
            f"it has: {row[1] if row else 'none'}"
        )


def _estimated_rows(conn: psycopg.Connection, table: CollectionTable) -> int:
    row = conn.execute(
        "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (table.schema, table.table),
    ).fetchone()
    return max(0, int(row[0])) if row else 0


# -- staging a run's documents --------------------------------------------------------------


def stage_documents(
    conn: psycopg.Connection,
    run_key: str,
    collection: str,
    documents: Iterable[EnrichedDocument],
    hash_key: str,
) -> tuple[int, int]:
    """(Re)create the run's staging tables holding ``documents``; returns (docs, chunks).

    Each chunk is staged with its content hash under ``hash_key`` (see :func:`content_hash`).
    """
    document_count = chunk_count = 0
    chunks, docs = run_table(run_key, "chunks"), run_table(run_key, "documents")
    with conn.transaction():
        _drop_run_tables(conn, run_key)
        for kind in STAGING_KINDS:
            conn.execute(sql.SQL(_RUN_TABLE_DDL[kind]).format(run_table(run_key, kind)))
        conn.execute(
            "INSERT INTO capstone.staging_runs (run_key, collection) VALUES (%s, %s)"
            " ON CONFLICT (run_key) DO UPDATE SET collection = EXCLUDED.collection, created_at = now()",
            (run_key, collection),
        )
        with conn.cursor() as cur:
            doc_rows: list[tuple[str, int]] = []
            # FREEZE: the table is new in this transaction, so its rows are written frozen and
            # later reads set no hint bits.
            copy_sql = sql.SQL(
                "COPY {} (id, document_id, chunk_index, content, metadata, content_hash) FROM STDIN (FREEZE)"
            ).format(chunks)
            with cur.copy(copy_sql) as copy:
                for document in documents:
                    metadata = json.dumps(document.metadata, ensure_ascii=False, sort_keys=True)
                    for index, text in enumerate(document.chunks):
                        row_hash = content_hash(text, metadata, hash_key)
                        copy.write_row(
                            (chunk_id(document.id, index), document.id, index, text, metadata, row_hash)
                        )
                    doc_rows.append((document.id, len(document.chunks)))
                    document_count += 1
                    chunk_count += len(document.chunks)
            with cur.copy(
                sql.SQL("COPY {} (document_id, chunk_count) FROM STDIN (FREEZE)").format(docs)
            ) as copy:
                for row in doc_rows:
                    copy.write_row(row)
        # The key is built after the load: one sort instead of a b-tree insert per row.
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(chunks))
    # Fresh statistics for the joins with the collection table (changed chunks, lost chunks):
    # without them the planner may pick nested loops over a big batch (minutes at 20k chunks).
    conn.execute(sql.SQL("ANALYZE {}, {}").format(chunks, docs))
    return document_count, chunk_count


_SEED_ROWS_PER_COPY = 5000


def seed_from(conn: psycopg.Connection, run_key: str, source: CollectionTable, hash_key: str) -> int:
    """Stage every chunk of ``source`` (the live version) whose document the run does not carry, with
    its content hash under ``hash_key``: a new version of the collection re-embeds them from the live
    version's own content and metadata. Returns the chunks staged.

    The rows stream through a ``WITH HOLD`` cursor and go into staging a few thousand at a time, so
    memory stays flat and no transaction stays open on ``source`` meanwhile.
    """
    chunks, docs = run_table(run_key, "chunks"), run_table(run_key, "documents")
    query = sql.SQL(
        "SELECT l.id, l.document_id, l.chunk_index, l.content, l.metadata FROM {} l"
        " WHERE NOT EXISTS (SELECT 1 FROM {} d WHERE d.document_id = l.document_id)"
    ).format(source.ident, docs)
    # What an earlier try of this step staged: everything but the run's own documents.
    conn.execute(
        sql.SQL(
            "DELETE FROM {} c WHERE NOT EXISTS (SELECT 1 FROM {} d WHERE d.document_id = c.document_id)"
        ).format(chunks, docs)
    )
    seeded = 0
    with conn.cursor(name=f"seed_{run_key[:20]}", withhold=True) as read:
        read.itersize = _SEED_ROWS_PER_COPY
        read.execute(query)
        while rows := read.fetchmany(_SEED_ROWS_PER_COPY):
            with conn.transaction(), conn.cursor() as cur:
                copy_sql = sql.SQL(
                    "COPY {} (id, document_id, chunk_index, content, metadata, content_hash) FROM STDIN"
                ).format(chunks)
                with cur.copy(copy_sql) as copy:
                    for chunk, document, index, text, metadata in rows:
                        metadata_json = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
                        copy.write_row(
                            (
                                chunk,
                                document,
                                index,
                                text,
                                metadata_json,
                                content_hash(text, metadata_json, hash_key),
                            )
                        )
            seeded += len(rows)
            log.info("staged %d chunks of %s for re-embedding so far", seeded, source.qualified)
    conn.execute(sql.SQL("ANALYZE {}").format(chunks))
    return seeded


def delete_unstaged(conn: psycopg.Connection, run_key: str, table: CollectionTable) -> int:
    """Delete the rows of ``table`` that the run did not stage: after a seeding run, a new version
    holds exactly the live version's chunks and the run's (say, a retired version rebuilt, whose
    documents were deleted since it was live). Returns rows deleted."""
    with conn.transaction():
        cursor = conn.execute(
            sql.SQL("DELETE FROM {} t WHERE NOT EXISTS (SELECT 1 FROM {} c WHERE c.id = t.id)").format(
                table.ident, run_table(run_key, "chunks")
            )
        )
        return cursor.rowcount


def drop_run_staging(conn: psycopg.Connection, run_key: str) -> None:
    """Drop the run's staging tables and forget the run."""
    with conn.transaction():
        _drop_run_tables(conn, run_key)
        conn.execute("DELETE FROM capstone.staging_runs WHERE run_key = %s", (run_key,))


def _drop_run_tables(conn: psycopg.Connection, run_key: str) -> None:
    conn.execute(
        sql.SQL("DROP TABLE IF EXISTS {}").format(
            sql.SQL(", ").join(run_table(run_key, kind) for kind in STAGING_KINDS)
        )
    )


def drop_stale_staging(conn: psycopg.Connection, collection: str, older_than_days: int = 7) -> int:
    """Drop the staging tables that crashed or abandoned runs of ``collection`` left; returns runs."""
    stale = [
        row[0]
        for row in conn.execute(
            "SELECT run_key FROM capstone.staging_runs"
            " WHERE collection = %s AND created_at < now() - make_interval(days => %s)",
            (collection, older_than_days),
        )
    ]
    for run_key in stale:
        drop_run_staging(conn, run_key)
    return len(stale)


# -- deciding what to embed -----------------------------------------------------------------


_CHANGED = (
    "FROM {chunks} s LEFT JOIN {table} t ON t.id = s.id"
    " WHERE (t.id IS NULL OR t.embedding IS NULL OR t.content_hash <> s.content_hash)"
)


def count_staged_chunks(conn: psycopg.Connection, run_key: str) -> int:
    """How many chunks the run has staged (0 when its staging is gone)."""
    if not run_staging_exists(conn, run_key):
        return 0
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(run_table(run_key, "chunks"))).fetchone()
    return int(row[0]) if row else 0


def _changed_chunks(conn: psycopg.Connection, run_key: str, table: CollectionTable) -> list[tuple[str, bool]]:
    """(id, absent from the table) of the run's new or changed chunks, in id order."""
    if not run_staging_exists(conn, run_key):
        return []
    query = sql.SQL("SELECT s.id, t.id IS NULL " + _CHANGED + " ORDER BY s.id").format(
        chunks=run_table(run_key, "chunks"), table=table.ident
    )
    return [(row[0], bool(row[1])) for row in conn.execute(query)]


def assign_batches(
    conn: psycopg.Connection,
    run_key: str,
    table: CollectionTable,
    batch_size: int,
    max_batches: int,
) -> list[BatchDescriptor]:
    """Share the run's new or changed chunks among mapped tasks: ``[{"batch_no", "chunks", "tasks"}]``.

    A chunk whose hash is already stored with an embedding is skipped. There are as many shares
    as ``batch_size`` chunks make, but never more than ``max_batches`` (the collection's
    ``parallel_tasks``, within Airflow's ``max_map_length``), all of one size give or take one
    chunk. Each is an id range kept in the run's ``batches`` staging table, so the descriptors
    that go through XCom stay tiny whatever the size of the run.
    """
    changed = _changed_chunks(conn, run_key, table)
    ids = [chunk for chunk, _new in changed]
    if not ids:
        if run_staging_exists(conn, run_key):
            conn.execute(sql.SQL("DELETE FROM {}").format(run_table(run_key, "batches")))
        return []
    shares = min(max_batches, math.ceil(len(ids) / batch_size))
    # Share boundaries ceil(i * n / shares): sizes differ by one chunk at most, the larger first.
    bounds = [-(-number * len(ids) // shares) for number in range(shares + 1)]
    rows = [
        (
            number,
            ids[start],
            ids[stop - 1],
            stop - start,
            sum(new for _id, new in changed[start:stop]),
        )
        for number, (start, stop) in enumerate(itertools.pairwise(bounds))
    ]
    batches = run_table(run_key, "batches")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("DELETE FROM {}").format(batches))
        with cur.copy(
            sql.SQL("COPY {} (batch_no, first_id, last_id, chunks, new_chunks) FROM STDIN").format(batches)
        ) as copy:
            for row in rows:
                copy.write_row(row)
    return [
        {"batch_no": number, "chunks": chunks, "tasks": len(rows)}
        for number, _first, _last, chunks, _new in rows
    ]


def batch_spans(conn: psycopg.Connection, run_key: str) -> list[tuple[int, str, str, int]]:
    """The run's embedding batches: ``[(batch_no, first_id, last_id, vectors)]`` in id order, where
    ``vectors`` is what ``generate_embedding`` staged for the batch (its chunk count until then)."""
    if not run_staging_exists(conn, run_key):
        return []
    rows = conn.execute(
        sql.SQL(
            "SELECT batch_no, first_id, last_id, coalesce(embedded, chunks) FROM {} ORDER BY batch_no"
        ).format(run_table(run_key, "batches"))
    ).fetchall()
    return [(int(n), str(first), str(last), int(chunks)) for n, first, last, chunks in rows]


def count_lost_chunks(conn: psycopg.Connection, run_key: str, table: CollectionTable) -> int:
    """Stored chunks of the run's documents that the new versions of those documents no longer have."""
    if not run_staging_exists(conn, run_key):
        return 0
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {} t JOIN {} d ON d.document_id = t.document_id"
            " WHERE t.chunk_index >= d.chunk_count"
        ).format(table.ident, run_table(run_key, "documents"))
    ).fetchone()
    return int(row[0]) if row else 0


# -- embedding batches ----------------------------------------------------------------------


def pending_batch_texts(
    conn: psycopg.Connection, run_key: str, table: CollectionTable, batch_no: int, size: int
) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) of the chunks of mapped batch ``batch_no`` that still need a vector, ``size`` at
    a time in id order (memory flat in the batch's size).

    Chunks whose vectors an earlier try staged are left out: a retried task resumes. The query runs
    once, through a ``WITH HOLD`` cursor whose result the server keeps: no transaction (and no
    snapshot holding back ``CREATE INDEX CONCURRENTLY`` or vacuum) stays open between steps, and
    ``conn`` (autocommit) is free for the writes. Raises :class:`StagingIncomplete` when the batch
    is not in the run's staging (a crash emptied it, or the run is over).
    """
    span = _batch_span(conn, run_key, batch_no)
    query = sql.SQL(
        "SELECT s.id, s.content " + _CHANGED + " AND s.id >= %s AND s.id <= %s"
        " AND NOT EXISTS (SELECT 1 FROM {vectors} v WHERE v.id = s.id) ORDER BY s.id"
    ).format(chunks=run_table(run_key, "chunks"), table=table.ident, vectors=run_table(run_key, "vectors"))
    with conn.cursor(name=f"pending_{batch_no}", withhold=True) as cur:
        cur.itersize = size
        cur.execute(query, span)
        while rows := cur.fetchmany(size):
            yield [row[0] for row in rows], [row[1] for row in rows]


def _batch_span(conn: psycopg.Connection, run_key: str, batch_no: int) -> tuple[str, str]:
    """(first id, last id) of mapped batch ``batch_no``; :class:`StagingIncomplete` when it is gone."""
    span = None
    if run_staging_exists(conn, run_key):
        span = conn.execute(
            sql.SQL("SELECT first_id, last_id FROM {} WHERE batch_no = %s").format(
                run_table(run_key, "batches")
            ),
            (batch_no,),
        ).fetchone()
    if span is None:
        raise StagingIncomplete(
            f"batch {batch_no} of run {run_key} is not in staging (did Postgres crash? it empties "
            "unlogged staging tables; or the run's upsert already dropped them): nothing to embed; "
            "re-run the DAG from load_enriched_documents"
        )
    return str(span[0]), str(span[1])


def count_batch_staged(conn: psycopg.Connection, run_key: str, batch_no: int) -> int:
    """Vectors staged so far for the chunks of mapped batch ``batch_no`` (by earlier tries too)."""
    first, last = _batch_span(conn, run_key, batch_no)
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE id >= %s AND id <= %s").format(run_table(run_key, "vectors")),
        (first, last),
    ).fetchone()
    return int(row[0]) if row else 0


def record_batch_embedded(conn: psycopg.Connection, run_key: str, batch_no: int) -> int:
    """Record how many vectors mapped batch ``batch_no`` has staged (over all its tries); returns it."""
    embedded = count_batch_staged(conn, run_key, batch_no)
    conn.execute(
        sql.SQL("UPDATE {} SET embedded = %s WHERE batch_no = %s").format(run_table(run_key, "batches")),
        (embedded, batch_no),
    )
    return embedded


def write_batch_vectors(
    conn: psycopg.Connection,
    run_key: str,
    ids: Sequence[str],
    vectors: np.ndarray,
) -> None:
    """Replace the staged vectors of ``ids`` with ``vectors`` (binary COPY, one transaction)."""
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
    if not run_staging_exists(conn, run_key):
        raise StagingIncomplete(
            f"the staging tables of run {run_key} are gone (finished, or dropped as stale): "
            "nothing to write the vectors to; re-run the DAG"
        )
    matrix = np.ascontiguousarray(vectors, dtype=">f4")
    dim = matrix.shape[1] if matrix.ndim == 2 else 0
    header = np.array([dim, 0], dtype=">i2").tobytes()
    table = run_table(run_key, "vectors")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(table), (list(ids),))
        with cur.copy(sql.SQL("COPY {} (id, embedding) FROM STDIN (FORMAT BINARY)").format(table)) as copy:
            copy.set_types(["text", "bytea"])
            for chunk, row in zip(ids, matrix, strict=True):
                copy.write_row((chunk, header + row.tobytes()))


def count_staged_vectors(conn: psycopg.Connection, run_key: str) -> int:
    """How many vectors the run has staged (0 when its staging is gone)."""
    if not run_staging_exists(conn, run_key):
        return 0
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(run_table(run_key, "vectors"))).fetchone()
    return int(row[0]) if row else 0


def staged_vector_ids(conn: psycopg.Connection, run_key: str) -> list[str]:
    """Ids of the run's staged vectors, in order (empty when its staging is gone)."""
    if not run_staging_exists(conn, run_key):
        return []
    query = sql.SQL("SELECT id FROM {} ORDER BY id").format(run_table(run_key, "vectors"))
    return [row[0] for row in conn.execute(query)]


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
            sql.SQL("SELECT id FROM {} WHERE id >= %s AND id <= %s ORDER BY id").format(
                run_table(run_key, "vectors")
            ),
            (first, last),
        )
    ]
    return [
        (ids[i], ids[min(i + span_size, len(ids)) - 1], len(ids[i : i + span_size]))
        for i in range(0, len(ids), span_size)
    ]


# -- merging into the collection ------------------------------------------------------------


_MERGE = (
    "INSERT INTO {table} AS t (id, document_id, chunk_index, content, metadata, content_hash,"
    " embedding, embedding_model, updated_at)"
    " SELECT c.id, c.document_id, c.chunk_index, c.content, c.metadata, c.content_hash,"
    " v.embedding{cast}, %s, clock_timestamp()"
    " FROM {vectors} v JOIN {chunks} c ON c.id = v.id"
    " WHERE v.id >= %s AND v.id <= %s AND c.id >= %s AND c.id <= %s"
)
_UPSERT = (
    " ON CONFLICT (id) DO UPDATE SET document_id = EXCLUDED.document_id,"
    " chunk_index = EXCLUDED.chunk_index, content = EXCLUDED.content,"
    " metadata = EXCLUDED.metadata, content_hash = EXCLUDED.content_hash,"
    " embedding = EXCLUDED.embedding, embedding_model = EXCLUDED.embedding_model,"
    " updated_at = EXCLUDED.updated_at"
)


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

    When none of the span's chunks were in the table at ``prepare_chunks`` time, a plain INSERT
    is tried first (no speculative insertion: about a quarter cheaper); should one of them be
    there by now (a retry, a concurrent run), that INSERT is rolled back to its savepoint and the
    span upserted.
    """
    parts = {
        "table": table.ident,
        "vectors": run_table(run_key, "vectors"),
        "chunks": run_table(run_key, "chunks"),
        "cast": table.cast,  # staging holds `vector`s of any dimension; a halfvec table casts them
    }
    params = (model, first_id, last_id, first_id, last_id)
    with conn.transaction():
        cursor = None
        if _all_new(conn, run_key, first_id, last_id):
            try:
                with conn.transaction():
                    cursor = conn.execute(sql.SQL(_MERGE).format(**parts), params)
            except psycopg.errors.UniqueViolation:
                cursor = None
        if cursor is None:
            cursor = conn.execute(sql.SQL(_MERGE + _UPSERT).format(**parts), params)
        if expected is not None and cursor.rowcount != expected:
            raise StagingIncomplete(
                f"merging {first_id}..{last_id} wrote {cursor.rowcount} rows where {expected} vectors were "
                "staged: the staged chunk texts are gone (did Postgres crash?); rolled back, re-run the DAG"
            )
        return cursor.rowcount


def _all_new(conn: psycopg.Connection, run_key: str, first_id: str, last_id: str) -> bool:
    """Whether every batch overlapping ``[first_id, last_id]`` held only chunks absent from the table."""
    row = conn.execute(
        sql.SQL(
            "SELECT coalesce(bool_and(new_chunks = chunks), false) FROM {}"
            " WHERE first_id <= %s AND last_id >= %s"
        ).format(run_table(run_key, "batches")),
        (last_id, first_id),
    ).fetchone()
    return bool(row and row[0])


def delete_lost_chunks(conn: psycopg.Connection, run_key: str, table: CollectionTable) -> int:
    """Delete stored chunks that re-indexed documents no longer have; returns rows deleted."""
    if not run_staging_exists(conn, run_key):
        return 0
    with conn.transaction():
        cursor = conn.execute(
            sql.SQL(
                "DELETE FROM {} t USING {} d"
                " WHERE d.document_id = t.document_id AND t.chunk_index >= d.chunk_count"
            ).format(table.ident, run_table(run_key, "documents"))
        )
        return cursor.rowcount


def document_ids(conn: psycopg.Connection, table: CollectionTable) -> list[str]:
    """The ids of the documents ``table`` (or the view at its name) holds; none if it does not exist."""
    if conn.execute("SELECT to_regclass(%s)", (table.ident.as_string(conn),)).fetchone() == (None,):
        return []
    query = sql.SQL("SELECT DISTINCT document_id FROM {}").format(table.ident)
    return [row[0] for row in conn.execute(query)]


def count_vectors(conn: psycopg.Connection, table: CollectionTable) -> int:
    """Rows of the collection that have an embedding."""
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE embedding IS NOT NULL").format(table.ident)
    ).fetchone()
    return int(row[0]) if row else 0


def stored_vector(value: object) -> np.ndarray:
    """A ``vector`` or ``halfvec`` value read with pgvector's types registered, as float32.

    pgvector-python reads ``vector`` as a numpy array before 0.5 and as ``pgvector.Vector`` from
    0.5 on (``halfvec`` as ``HalfVector`` in both); the package supports both (``pgvector>=0.4``).
    """
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    to_numpy = getattr(value, "to_numpy", None)
    if to_numpy is None:
        raise TypeError(f"not a pgvector value: {type(value).__name__}")
    return np.asarray(to_numpy(), dtype=np.float32)

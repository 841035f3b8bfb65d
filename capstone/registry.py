"""The collection registry: what ``search`` needs to know about a collection, kept in Postgres.

``capstone`` never reads the YAML files (that is ``dag_factory``'s job). Instead, every validation
of a collection's live version (and every switch to a new one) records the collection in
``capstone.collections``,
in the collection's own database: its table, embedding provider and model, metric, index and the
query-time settings (``ef_search`` / ``probes``), and how it is searched by default (mode, text
search configuration, hybrid ranking). ``python -m capstone search`` reads that row to embed a
query with the right model and search the right table the way validation did.

The row describes the collection's *live* version (:mod:`capstone.versions`): ``table_name`` is
the stable name consumers query, ``version``/``version_table`` the live version searches read.
Validating a version that is not live yet registers nothing; the switch to it rewrites the row in
the same transaction as the view, and ``rollback`` restores the row the version had.

A row is identified by its stable name (``schema_name``, ``table_name``), as the version catalog
is: a database holds one collection per table. Two deployments that share a database (staging and
production with a schema each) may both have a collection ``documents``; each keeps its own row,
and a search by name alone that finds two tables refuses to guess (:class:`AmbiguousCollection`)
and asks for the schema. A table belongs to one collection name: a spec of another name writing to
it fails at once (:class:`CollectionTableTaken`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from capstone.contracts import ValidationSummary, VersionRef
from capstone.embeddings.base import Embedder
from capstone.errors import TerminalError
from capstone.index_build import IndexParams
from capstone.settings import (
    CollectionSettings,
    EmbeddingSettings,
    IndexType,
    Metric,
    SearchSettings,
    VectorType,
)
from capstone.store import STAGING_SCHEMA, CollectionTable

__all__ = [
    "REGISTRY_TABLE",
    "AmbiguousCollection",
    "CollectionNotRegistered",
    "CollectionRecord",
    "CollectionTableTaken",
    "check_table_owner",
    "lookup",
    "record_at_version",
    "records",
    "register",
    "register_row",
    "registered_row",
    "row_for_table",
    "row_values",
]

log = logging.getLogger(__name__)

REGISTRY_TABLE = "collections"
_REGISTRY = sql.Identifier(STAGING_SCHEMA, REGISTRY_TABLE)
_REGISTRY_LOCK = 7_245_021_114  # advisory lock serialising the registry's DDL
_COLUMNS = (
    "name",
    "schema_name",
    "table_name",
    "connection_id",
    "provider",
    "model",
    "dimension",
    "metric",
    "index_type",
    "index_name",
    "index_params",
    "ef_search",
    "probes",
    "embedding_options",
    "search_options",
    "vector_type",
    "version",
    "version_table",
    "last_validation",
)
_JSON_COLUMNS = frozenset({"index_params", "embedding_options", "search_options", "last_validation"})
# Columns added after the first release, with their types: registries created earlier get them.
_ADDED_COLUMNS = {"search_options": "jsonb", "vector_type": "text", "version": "int", "version_table": "text"}


class CollectionNotRegistered(LookupError):
    """No collection of that name has been validated in this database yet."""

    def __init__(self, name: str, where: str, why: str = "is not indexed yet") -> None:
        super().__init__(
            f"collection {name!r} {why} in {where}: run its Airflow DAG {name!r} (trigger it, "
            f"or publish an event of its source asset) and search again once its validate_index_health "
            "task has run; if the collection lives in another Postgres, pass --connection or --dsn"
        )


class AmbiguousCollection(LookupError):
    """Several tables of one database are registered under the collection name searched for (two
    deployments sharing the database, a schema each); the schema says which one."""

    def __init__(self, name: str, where: str, tables: list[str]) -> None:
        super().__init__(
            f"collection {name!r} has {len(tables)} tables in {where}: {'; '.join(tables)}. Say which "
            "one: --schema SCHEMA on the command line, Searcher(name, schema=...) in Python (two tables "
            "in one schema: drop the one no longer used, its view and its version tables)"
        )


class CollectionTableTaken(TerminalError, ValueError):
    """The spec's table is registered to a collection of another name in this database."""


@dataclass(frozen=True)
class CollectionRecord:
    """One collection as search sees it: where it is, how to embed queries, how to search it.

    ``embedding`` holds the model settings and where the API key comes from (never the key).
    ``table`` is the stable name consumers query; ``version_table`` the table of the live version
    behind it (:mod:`capstone.versions`), which searches read (None for rows of earlier releases,
    whose ``table`` was the table itself).
    """

    name: str
    schema: str
    table: str
    connection_id: str
    embedding: EmbeddingSettings
    metric: Metric
    index_type: IndexType
    index_name: str
    index_params: dict[str, int | None]
    ef_search: int
    probes: int
    search: SearchSettings
    vector_type: VectorType
    version: int | None = None
    version_table: str | None = None
    last_validation: dict[str, Any] | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_settings(
        cls, settings: CollectionSettings, version: VersionRef | None = None
    ) -> CollectionRecord:
        """The record of a collection, as its settings describe it, searching ``version``'s table."""
        index = settings.index
        table = settings.store.table if version is None else version["table"]
        at_version = dataclasses.replace(settings, store=dataclasses.replace(settings.store, table=table))
        shape: dict[str, int | None] = (
            {"m": index.m, "ef_construction": index.ef_construction}
            if index.type == "hnsw"
            else {"lists": index.lists}
        )
        if index.quantization == "binary":  # searched by Hamming distance, then re-ranked
            shape["binary_rerank"] = index.rerank_candidates
        return cls(
            name=settings.collection,
            schema=settings.store.schema,
            table=settings.store.table,
            connection_id=settings.store.connection_id,
            embedding=settings.embedding,
            metric=index.metric,
            index_type=index.type,
            index_name=IndexParams.of(at_version).index_name,
            index_params=shape,
            ef_search=index.ef_search,
            probes=index.probes,
            search=settings.search,
            vector_type=settings.store.vector_type,
            version=None if version is None else version["number"],
            version_table=None if version is None else version["table"],
        )

    @property
    def provider(self) -> str:
        return self.embedding.provider

    @property
    def model(self) -> str:
        return self.embedding.model

    @property
    def dimension(self) -> int:
        return self.embedding.dimension

    @property
    def store_table(self) -> CollectionTable:
        """The table searches read: the live version's (or, for a row of an earlier release, the
        collection's table itself)."""
        return CollectionTable(
            self.schema,
            self.version_table or self.table,
            self.dimension,
            self.search.text_config,
            self.vector_type,
        )

    def embedder(self) -> Embedder:
        """The embedder the collection's chunks were embedded with, for embedding queries."""
        from capstone.embeddings import embedder_for

        # Where and on what the workers' model ran (a GPU, say) is not where searches run: pick what
        # this host has (torch and ONNX Runtime give the same vectors).
        return embedder_for(dataclasses.replace(self.embedding, device="auto", threads=None, backend="auto"))


def ensure_registry(conn: psycopg.Connection) -> None:
    """Create ``capstone.collections`` if missing (safe when several tasks do it at once)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_REGISTRY_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(STAGING_SCHEMA)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " name text NOT NULL, schema_name text NOT NULL, table_name text NOT NULL,"
                " connection_id text NOT NULL, provider text NOT NULL, model text NOT NULL,"
                " dimension int NOT NULL, metric text NOT NULL, index_type text NOT NULL,"
                " index_name text NOT NULL, index_params jsonb NOT NULL, ef_search int NOT NULL,"
                " probes int NOT NULL, embedding_options jsonb NOT NULL DEFAULT '{{}}',"
                " search_options jsonb, vector_type text, version int, version_table text,"
                " last_validation jsonb,"
                " updated_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (schema_name, table_name))"
            ).format(_REGISTRY)
        )
        _key_by_table(conn)
        # Registries created by earlier releases (checked first: ALTER locks the table).
        present = _registry_columns(conn)
        for column, kind in _ADDED_COLUMNS.items():
            if column not in present:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                        _REGISTRY, sql.Identifier(column), sql.SQL(kind)
                    )
                )


def _key_by_table(conn: psycopg.Connection) -> None:
    """Registries of earlier releases are keyed by the collection name alone: key them by the
    stable name (keeping the newest row of a table registered under two names)."""
    key = conn.execute(
        "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_constraint c"
        " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
        " WHERE c.conrelid = to_regclass(%s) AND c.contype = 'p' GROUP BY c.conname",
        (f"{STAGING_SCHEMA}.{REGISTRY_TABLE}",),
    ).fetchone()
    if key is not None and key[0] == ["schema_name", "table_name"]:
        return
    conn.execute(
        sql.SQL(
            "DELETE FROM {0} r USING {0} newer WHERE (r.schema_name, r.table_name)"
            " = (newer.schema_name, newer.table_name) AND r.updated_at < newer.updated_at"
        ).format(_REGISTRY)
    )
    constraint = conn.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'p'",
        (f"{STAGING_SCHEMA}.{REGISTRY_TABLE}",),
    ).fetchone()
    if constraint is not None:
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(_REGISTRY, sql.Identifier(constraint[0]))
        )
    conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (schema_name, table_name)").format(_REGISTRY))


def row_values(record: CollectionRecord, last_validation: ValidationSummary | None = None) -> dict[str, Any]:
    """The registry row of ``record`` (column -> JSON-able value), as :func:`register_row` writes it
    and :mod:`capstone.versions` keeps it for a rollback."""
    return {
        "name": record.name,
        "schema_name": record.schema,
        "table_name": record.table,
        "connection_id": record.connection_id,
        "provider": record.provider,
        "model": record.model,
        "dimension": record.dimension,
        "metric": record.metric,
        "index_type": record.index_type,
        "index_name": record.index_name,
        "index_params": record.index_params,
        "ef_search": record.ef_search,
        "probes": record.probes,
        "embedding_options": dataclasses.asdict(record.embedding),
        "search_options": dataclasses.asdict(record.search),
        "vector_type": record.vector_type,
        "version": record.version,
        "version_table": record.version_table,
        "last_validation": last_validation,
    }


def register(
    conn: psycopg.Connection, record: CollectionRecord, last_validation: ValidationSummary | None = None
) -> None:
    """Insert or replace the collection's row, with the summary of its latest validation."""
    register_row(conn, row_values(record, last_validation))


def register_row(conn: psycopg.Connection, row: dict[str, Any]) -> None:
    """Insert or replace a registry row made by :func:`row_values`."""
    ensure_registry(conn)
    values = [
        None if row.get(column) is None else Jsonb(row[column]) if column in _JSON_COLUMNS else row[column]
        for column in _COLUMNS
    ]
    updates = sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(column))
        for column in _COLUMNS
        if column not in ("schema_name", "table_name")
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} ({}, updated_at) VALUES ({}, now())"
            " ON CONFLICT (schema_name, table_name) DO UPDATE SET {},"
            " updated_at = now()"
        ).format(
            _REGISTRY,
            sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)),
            updates,
        ),
        values,
    )
    _warn_of_namesakes(conn, row["name"], row["schema_name"], row["table_name"])


def _warn_of_namesakes(conn: psycopg.Connection, name: str, schema: str, table: str) -> None:
    """Say so when the collection's name also has another table in this database: searches by
    name alone must then say which schema they mean."""
    others = conn.execute(
        sql.SQL(
            "SELECT schema_name || '.' || table_name FROM {} WHERE name = %s"
            " AND (schema_name, table_name) <> (%s, %s)"
            " AND to_regclass(format('%%I.%%I', schema_name, table_name)) IS NOT NULL"
        ).format(_REGISTRY),
        (name, schema, table),
    ).fetchall()
    if others:
        log.warning(
            "collection %r is also registered for %s in this database (another deployment sharing it?): "
            "searches by name must now say which schema they mean (--schema, Searcher(schema=...))",
            name,
            ", ".join(row[0] for row in others),
        )


# How the embedding tasks ran, which embedding a query never uses: records written before these
# settings existed lack them, and a search reads them as these values (not defaults of the spec).
_TASK_ONLY: dict[str, object] = {
    "parallel_tasks": 1,
    "pool_slots": 1,
    "device": "auto",
    "threads": None,
    "backend": "auto",
    "max_concurrent_requests": 1,
    "max_tokens_per_request": 300_000,
}
# How collections registered before search options existed are searched: by vector, as they were
# validated (their table gets its keyword column on its next run, which registers it anew).
_EARLIER_SEARCH = SearchSettings(mode="vector", text_config="english", rrf_k=60, candidates=40)


def lookup(conn: psycopg.Connection, name: str, schema: str | None = None) -> CollectionRecord:
    """The registered collection ``name`` (in ``schema``, when given): :class:`CollectionNotRegistered`
    when there is none, :class:`AmbiguousCollection` when the name has tables in several schemas.
    Rows whose stable name no longer exists (a dropped collection) are not counted."""
    where = _describe(conn)
    if not _registry_columns(conn):
        raise CollectionNotRegistered(name, where)
    rows = _existing_rows(conn, [name], schema)
    if not rows:
        raise CollectionNotRegistered(name, where if schema is None else f"schema {schema!r} of {where}")
    if len(rows) > 1:
        raise AmbiguousCollection(name, where, [_describe_row(row) for row in rows])
    return _record(rows[0], where)


def _existing_rows(
    conn: psycopg.Connection, names: list[str] | None, schema: str | None = None
) -> list[dict[str, Any]]:
    """The registry rows of ``names`` (all when None), in ``schema`` when given, whose stable name
    still exists, by schema and table."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            sql.SQL(
                "SELECT * FROM {} WHERE (%(names)s::text[] IS NULL OR name = ANY(%(names)s::text[]))"
                " AND (%(schema)s::text IS NULL OR schema_name = %(schema)s)"
                " AND to_regclass(format('%%I.%%I', schema_name, table_name)) IS NOT NULL"
                " ORDER BY schema_name, table_name"
            ).format(_REGISTRY),
            {"names": names, "schema": schema},
        ).fetchall()


def records(conn: psycopg.Connection, names: list[str] | None = None) -> list[CollectionRecord]:
    """Every registered collection of this database (of ``names``, when given) whose stable name
    exists, by schema and table: what a dashboard lists. Rows of releases too old to search are left
    out (:func:`lookup` says why for one of them)."""
    where = _describe(conn)
    if not _registry_columns(conn):
        return []
    found = []
    for row in _existing_rows(conn, names):
        try:
            found.append(_record(row, where))
        except CollectionNotRegistered as exc:
            log.info("%s", exc)
    return found


def record_at_version(conn: psycopg.Connection, live: CollectionRecord, number: int) -> CollectionRecord:
    """The record a search of version ``number`` of ``live``'s collection needs: the registry row the
    version had when it was last live (a retired version), else ``live``'s with that version's table,
    embedding and vector type (a version still being built, never registered). Raises
    :class:`CollectionNotRegistered` when the collection keeps no such version."""
    from capstone import versions

    if number == live.version:
        return live
    rows = versions.catalog_rows(conn, live.schema, live.table, number)
    row = rows[0] if rows else None
    if row is None:
        raise CollectionNotRegistered(f"{live.name} version {number}", _describe(conn), "is not kept")
    if row["record"]:
        when = row["live_until"] or row["created_at"]
        kept = _record({**row["record"], "updated_at": when}, _describe(conn))
        return dataclasses.replace(kept, last_validation=row["last_validation"] or kept.last_validation)
    embedding = _embedding_settings(row["embedding"])
    if embedding is None:
        raise CollectionNotRegistered(
            f"{live.name} version {number}", _describe(conn), "is of an earlier release"
        )
    return dataclasses.replace(
        live,
        embedding=embedding,
        vector_type=row["embedding"].get("vector_type", live.vector_type),
        version=number,
        version_table=row["table_name"],
        last_validation=row["last_validation"],
        updated_at=row["created_at"],
    )


def _describe_row(row: dict[str, Any]) -> str:
    """``schema.table (provider model, validated <when>)``, to tell two registrations apart."""
    return (
        f"{row['schema_name']}.{row['table_name']} ({row['provider']} {row['model']}, validated "
        f"{row['updated_at']:%Y-%m-%d %H:%M %Z})"
    )


def _embedding_settings(stored: dict[str, Any]) -> EmbeddingSettings | None:
    """The embedding settings a registry row (or the version catalog) stored, the task-only ones at
    their defaults; None when it lacks some (stored by an earlier release)."""
    fields = {field.name for field in dataclasses.fields(EmbeddingSettings)}
    if not fields - _TASK_ONLY.keys() <= set(stored):
        return None
    return EmbeddingSettings(**{**_TASK_ONLY, **{key: stored[key] for key in fields if key in stored}})


def _record(row: dict[str, Any], where: str) -> CollectionRecord:
    """The :class:`CollectionRecord` of a registry row."""
    embedding = _embedding_settings(row["embedding_options"])
    if embedding is None:
        raise CollectionNotRegistered(row["name"], where, "was registered by an earlier release of capstone")
    return CollectionRecord(
        name=row["name"],
        schema=row["schema_name"],
        table=row["table_name"],
        connection_id=row["connection_id"],
        embedding=embedding,
        metric=row["metric"],
        index_type=row["index_type"],
        index_name=row["index_name"],
        index_params=row["index_params"],
        ef_search=row["ef_search"],
        probes=row["probes"],
        search=SearchSettings(**row["search_options"]) if row.get("search_options") else _EARLIER_SEARCH,
        vector_type=row.get("vector_type") or "vector",  # rows of earlier releases: vector columns
        version=row.get("version"),
        version_table=row.get("version_table"),
        last_validation=row["last_validation"],
        updated_at=row["updated_at"],
    )


def row_for_table(conn: psycopg.Connection, schema: str, table: str) -> dict[str, Any] | None:
    """The registry row (as :func:`row_values` makes them) of the collection at ``schema.table``."""
    if not _registry_columns(conn):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            sql.SQL("SELECT * FROM {} WHERE schema_name = %s AND table_name = %s").format(_REGISTRY),
            (schema, table),
        ).fetchone()
    if row is None:
        return None
    return {column: row.get(column) for column in _COLUMNS}


def _registry_columns(conn: psycopg.Connection) -> set[str]:
    """The columns ``capstone.collections`` has (none when there is no registry yet)."""
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = to_regclass(%s)"
        " AND a.attnum > 0 AND NOT a.attisdropped",
        (f"{STAGING_SCHEMA}.{REGISTRY_TABLE}",),
    ).fetchall()
    return {row[0] for row in rows}


def registered_row(conn: psycopg.Connection, schema: str, table: str) -> CollectionRecord | None:
    """What the registry holds for the collection at ``schema.table`` (read as a search would), or
    None when nothing is registered there (or the row is of a release too old to search)."""
    if not _registry_columns(conn):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            sql.SQL("SELECT * FROM {} WHERE schema_name = %s AND table_name = %s").format(_REGISTRY),
            (schema, table),
        ).fetchone()
    if row is None:
        return None
    try:
        return _record(row, _describe(conn))
    except CollectionNotRegistered:
        return None


def check_table_owner(conn: psycopg.Connection, name: str, schema: str, table: str) -> None:
    """Refuse (:class:`CollectionTableTaken`) to write collection ``name`` to ``schema.table`` when
    that table is registered to a collection of another name whose table still exists."""
    if not _registry_columns(conn):
        return
    row = conn.execute(
        sql.SQL(
            "SELECT name, updated_at FROM {} WHERE schema_name = %s AND table_name = %s AND name <> %s"
            " AND to_regclass(format('%%I.%%I', schema_name, table_name)) IS NOT NULL"
        ).format(_REGISTRY),
        (schema, table, name),
    ).fetchone()
    if row is not None:
        raise CollectionTableTaken(
            f"collection {name!r} writes {schema}.{table}, which is collection {row[0]!r} in "
            f"{_describe(conn)} (validated {row[1]:%Y-%m-%d %H:%M %Z}): one table holds one collection. "
            f"Give {name!r} a table of its own (store.table or store.schema in its YAML file), or, if "
            f"{row[0]!r} is gone for good, drop its view {schema}.{table} and its version tables first"
        )


def _describe(conn: psycopg.Connection) -> str:
    """``database 'x' on host:port``, for messages (never the password)."""
    info = conn.info
    return f"database {info.dbname!r} on {info.host}:{info.port}"

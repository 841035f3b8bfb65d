"""The collection registry: what ``search`` needs to know about a collection, kept in Postgres.

``capstone`` never reads the YAML files (that is ``dag_factory``'s job). Instead, every run of a
collection's ``validate_index_health`` task records the collection in ``capstone.collections``,
in the collection's own database: its table, embedding provider and model, metric, index and the
query-time settings (``ef_search`` / ``probes``). ``python -m capstone search`` reads that row to
embed a query with the right model and search the right table the way validation did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from capstone.index_build import IndexParams
from capstone.pipeline import PipelineSettings
from capstone.store import STAGING_SCHEMA, CollectionTable

__all__ = ["REGISTRY_TABLE", "CollectionNotRegistered", "CollectionRecord", "lookup", "register"]

REGISTRY_TABLE = "collections"
_REGISTRY = sql.Identifier(STAGING_SCHEMA, REGISTRY_TABLE)
_REGISTRY_LOCK = 7_245_021_114  # advisory lock serialising the registry's DDL
# Provider options a search needs besides provider/model/dimension (never a secret: key *sources* only).
_EMBEDDING_OPTIONS = (
    "normalize",
    "request_batch_size",
    "base_url",
    "api_key_connection_id",
    "api_key_env",
    "request_timeout_seconds",
)
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
    "last_validation",
)


class CollectionNotRegistered(LookupError):
    """No collection of that name has been validated in this database yet."""

    def __init__(self, name: str, where: str) -> None:
        super().__init__(
            f"collection {name!r} is not indexed yet in {where}: run its Airflow DAG {name!r} (trigger it, "
            f"or publish an event of its source asset) and search again once its validate_index_health "
            "task has run; if the collection lives in another Postgres, pass --connection or --dsn"
        )


@dataclass(frozen=True)
class CollectionRecord:
    """One collection as search sees it: where it is, how to embed queries, how to search it."""

    name: str
    schema: str
    table: str
    provider: str
    model: str
    dimension: int
    metric: str
    index_type: str
    index_params: dict[str, int | None]
    ef_search: int
    probes: int
    connection_id: str = "vector_store_default"
    embedding_options: dict[str, Any] = field(default_factory=dict)
    last_validation: dict[str, Any] | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_settings(cls, settings: PipelineSettings, index: dict[str, Any]) -> CollectionRecord:
        """The record of a collection from its pipeline settings and its spec's ``index`` section."""
        index_type = str(index.get("type", "hnsw"))
        shape: dict[str, int | None] = (
            {"m": int(index.get("m", 16)), "ef_construction": int(index.get("ef_construction", 64))}
            if index_type == "hnsw"
            else {"lists": index.get("lists")}
        )
        return cls(
            name=settings.collection,
            schema=settings.schema,
            table=settings.table,
            provider=settings.provider,
            model=settings.model,
            dimension=settings.dimension,
            metric=str(index.get("metric", "cosine")),
            index_type=index_type,
            index_params=shape,
            ef_search=int(index.get("ef_search", 100)),
            probes=int(index.get("probes", 10)),
            connection_id=settings.connection_id,
            embedding_options={option: getattr(settings, option) for option in _EMBEDDING_OPTIONS},
        )

    @property
    def store_table(self) -> CollectionTable:
        """The collection's table."""
        return CollectionTable(self.schema, self.table, self.dimension)

    @property
    def index(self) -> IndexParams:
        """The index the pipeline builds for this collection (its name carries a parameter hash)."""
        return IndexParams(
            schema=self.schema,
            table=self.table,
            index_type=self.index_type,  # type: ignore[arg-type]
            metric=self.metric,  # type: ignore[arg-type]
            m=int(self.index_params.get("m") or 16),
            ef_construction=int(self.index_params.get("ef_construction") or 64),
            lists=self.index_params.get("lists"),
        )

    def embedder(self) -> Any:
        """The embedder the collection's chunks were embedded with, for embedding queries."""
        from capstone.embeddings import create_embedder, resolve_api_key

        options = self.embedding_options
        api_key = (
            resolve_api_key(
                options.get("api_key_connection_id"), options.get("api_key_env", "OPENAI_API_KEY")
            )
            if self.provider == "openai"
            else None
        )
        return create_embedder(
            self.provider,  # type: ignore[arg-type]
            model=self.model,
            dimension=self.dimension,
            normalize=bool(options.get("normalize", True)),
            request_batch_size=int(options.get("request_batch_size", 64)),
            base_url=options.get("base_url"),
            api_key=api_key,
            timeout=float(options.get("request_timeout_seconds", 60.0)),
        )


def ensure_registry(conn: psycopg.Connection) -> None:
    """Create ``capstone.collections`` if missing (safe when several tasks do it at once)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_REGISTRY_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(STAGING_SCHEMA)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " name text PRIMARY KEY, schema_name text NOT NULL, table_name text NOT NULL,"
                " connection_id text NOT NULL, provider text NOT NULL, model text NOT NULL,"
                " dimension int NOT NULL, metric text NOT NULL, index_type text NOT NULL,"
                " index_name text NOT NULL, index_params jsonb NOT NULL, ef_search int NOT NULL,"
                " probes int NOT NULL, embedding_options jsonb NOT NULL DEFAULT '{{}}',"
                " last_validation jsonb, updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(_REGISTRY)
        )


def register(
    conn: psycopg.Connection, record: CollectionRecord, last_validation: dict[str, Any] | None = None
) -> None:
    """Insert or replace the collection's row, with the summary of its latest validation."""
    ensure_registry(conn)
    values = (
        record.name,
        record.schema,
        record.table,
        record.connection_id,
        record.provider,
        record.model,
        record.dimension,
        record.metric,
        record.index_type,
        record.index.index_name,
        json.dumps(record.index_params),
        record.ef_search,
        record.probes,
        json.dumps(record.embedding_options),
        None if last_validation is None else json.dumps(last_validation),
    )
    updates = sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(column)) for column in _COLUMNS[1:]
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} ({}, updated_at) VALUES ({}, now()) ON CONFLICT (name) DO UPDATE SET {},"
            " updated_at = now()"
        ).format(
            _REGISTRY,
            sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)),
            updates,
        ),
        values,
    )


def lookup(conn: psycopg.Connection, name: str) -> CollectionRecord:
    """The registered collection ``name``; :class:`CollectionNotRegistered` when there is none."""
    where = _describe(conn)
    exists = conn.execute("SELECT to_regclass(%s)", (f"{STAGING_SCHEMA}.{REGISTRY_TABLE}",)).fetchone()
    if not exists or exists[0] is None:
        raise CollectionNotRegistered(name, where)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(sql.SQL("SELECT * FROM {} WHERE name = %s").format(_REGISTRY), (name,)).fetchone()
    if row is None:
        raise CollectionNotRegistered(name, where)
    return CollectionRecord(
        name=row["name"],
        schema=row["schema_name"],
        table=row["table_name"],
        provider=row["provider"],
        model=row["model"],
        dimension=row["dimension"],
        metric=row["metric"],
        index_type=row["index_type"],
        index_params=row["index_params"],
        ef_search=row["ef_search"],
        probes=row["probes"],
        connection_id=row["connection_id"],
        embedding_options=row["embedding_options"],
        last_validation=row["last_validation"],
        updated_at=row["updated_at"],
    )


def _describe(conn: psycopg.Connection) -> str:
    """``database 'x' on host:port``, for messages (never the password)."""
    info = conn.info
    return f"database {info.dbname!r} on {info.host}:{info.port}"

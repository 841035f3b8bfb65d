"""Nearest-neighbour search over a collection, through its ANN index.

ANN search runs inside :func:`ann_session`, a transaction that sets the index's query-time knob
(``hnsw.ef_search`` or ``ivfflat.probes``) with ``set_config(..., is_local => true)`` -- that is
``SET LOCAL`` with the value passed as a parameter -- and turns sequential scans off, so that even
a small table is searched through its index: what validation measures and what ``capstone search``
shows is what the index answers, not what a sequential scan would.

Exact neighbours, to compare the index with, come from :mod:`capstone.exact_scan` (one pass over
the table for many queries).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone.index_build import DISTANCE_OPERATORS
from capstone.registry import CollectionRecord, lookup
from capstone.settings import HNSW_EF_SEARCH, IndexType, Metric
from capstone.store import CollectionTable

__all__ = [
    "MAX_EF_SEARCH",
    "SNIPPET_CHARS",
    "Hit",
    "SearchTarget",
    "ann_search",
    "ann_session",
    "ann_statement",
    "distinct_documents",
    "explain",
    "hits_from_rows",
    "resolve_dsn",
    "search_collection",
    "search_record",
]

MAX_EF_SEARCH = HNSW_EF_SEARCH[1]  # pgvector's upper bound for hnsw.ef_search
SNIPPET_CHARS = 300  # characters of a hit's text that searches return


@dataclass(frozen=True)
class SearchTarget:
    """What to search and how: the collection table, its metric, and the index's query-time knob."""

    table: CollectionTable
    metric: Metric
    index_type: IndexType
    ef_search: int
    probes: int
    lists: int | None = None

    @classmethod
    def of(cls, record: CollectionRecord) -> SearchTarget:
        """The target of a registered collection."""
        lists = record.index_params.get("lists")
        return cls(
            record.store_table, record.metric, record.index_type, record.ef_search, record.probes, lists
        )

    @property
    def knob(self) -> tuple[str, int]:
        """The query-time setting searches use: ``("ef_search", n)`` or ``("probes", n)``."""
        return ("ef_search", self.ef_search) if self.index_type == "hnsw" else ("probes", self.probes)

    def with_knob(self, value: int) -> SearchTarget:
        """This target searched with another ``ef_search`` (HNSW) or ``probes`` (IVFFlat)."""
        if self.index_type == "hnsw":
            return replace(self, ef_search=value)
        return replace(self, probes=value)

    def describe_knob(self) -> str:
        """``ef_search=100`` or ``probes=10``."""
        name, value = self.knob
        return f"{name}={value}"


@dataclass(frozen=True)
class Hit:
    """One chunk a search returned, ``rank`` 1 first; ``distance`` as the metric's operator gives it."""

    rank: int
    chunk_id: str
    document_id: str
    chunk_index: int
    distance: float
    snippet: str
    metric: str

    @property
    def score(self) -> float:
        """Similarity for cosine (``1 - distance``) and inner product (``-distance``); distance for l2."""
        if self.metric == "cosine":
            return 1.0 - self.distance
        if self.metric == "inner_product":
            return -self.distance
        return self.distance


# -- statements -------------------------------------------------------------------------------


def ann_statement(target: SearchTarget) -> sql.Composed:
    """The ANN query: ``ORDER BY embedding <op> %(query)s LIMIT %(limit)s``, served by the index."""
    operator = sql.SQL(DISTANCE_OPERATORS[target.metric])  # from a fixed table of pgvector operators
    return sql.SQL(
        "SELECT id, document_id, chunk_index, embedding {op} %(query)s AS distance,"
        " left(content, {snippet}) FROM {table} WHERE embedding IS NOT NULL"
        " ORDER BY embedding {op} %(query)s LIMIT %(limit)s"
    ).format(op=operator, snippet=sql.Literal(SNIPPET_CHARS), table=target.table.ident)


# -- sessions ---------------------------------------------------------------------------------


@contextmanager
def ann_session(conn: psycopg.Connection, target: SearchTarget) -> Iterator[dict[str, str]]:
    """A transaction in which ANN queries go through the index with the target's ef_search/probes.

    Yields the settings applied; they end with the transaction, leaving the connection as it was.
    """
    name, value = target.knob
    settings = {f"{'hnsw' if target.index_type == 'hnsw' else 'ivfflat'}.{name}": str(value)}
    settings["enable_seqscan"] = "off"
    with conn.transaction():
        for setting, setting_value in settings.items():
            conn.execute("SELECT set_config(%s, %s, true)", (setting, setting_value))
        yield settings


# -- searching --------------------------------------------------------------------------------


def hits_from_rows(rows: Sequence[Sequence[Any]], metric: str) -> list[Hit]:
    """Hits, ranked 1..n in row order, from rows of (id, document_id, chunk_index, distance, snippet)."""
    return [
        Hit(rank, chunk_id, document_id, chunk_index, float(distance), snippet, metric)
        for rank, (chunk_id, document_id, chunk_index, distance, snippet) in enumerate(rows, start=1)
    ]


def ann_search(conn: psycopg.Connection, target: SearchTarget, vector: np.ndarray, limit: int) -> list[Hit]:
    """The ``limit`` nearest chunks through the index; call inside :func:`ann_session`."""
    query = {"query": np.asarray(vector, dtype=np.float32), "limit": limit}
    return hits_from_rows(conn.execute(ann_statement(target), query).fetchall(), target.metric)


def distinct_documents(hits: Sequence[Hit], limit: int | None = None) -> list[Hit]:
    """The best hit of each document, in rank order (re-ranked 1..n), at most ``limit`` of them."""
    best: dict[str, Hit] = {}
    for hit in hits:
        best.setdefault(hit.document_id, hit)
    ranked = [replace(hit, rank=rank) for rank, hit in enumerate(best.values(), start=1)]
    return ranked if limit is None else ranked[:limit]


def explain(
    conn: psycopg.Connection, statement: sql.Composed, vector: np.ndarray, limit: int
) -> list[dict[str, Any]]:
    """The plan nodes (``EXPLAIN (FORMAT JSON)``, flattened, outermost first) of a search statement."""
    row = conn.execute(
        sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement),
        {"query": np.asarray(vector, dtype=np.float32), "limit": limit},
    ).fetchone()
    nodes: list[dict[str, Any]] = []
    pending = [row[0][0]["Plan"]] if row else []
    while pending:
        node = pending.pop(0)
        nodes.append(node)
        pending.extend(node.get("Plans", []))
    return nodes


def search_record(dsn: str, record: CollectionRecord, query: str, k: int = 5) -> list[Hit]:
    """Embed ``query`` with the registered collection's model and return its ``k`` nearest chunks."""
    vector = record.embedder().embed([query])[0]
    target = SearchTarget.of(record)
    if target.index_type == "hnsw":
        # HNSW returns at most ef_search rows: a longer result list needs a longer candidate list.
        target = target.with_knob(min(MAX_EF_SEARCH, max(target.ef_search, k)))
    with psycopg.connect(dsn, autocommit=True, application_name="capstone search") as conn:
        register_vector(conn)
        with ann_session(conn, target):
            return ann_search(conn, target, vector, k)


def search_collection(
    collection: str, query: str, k: int = 5, *, dsn: str | None = None, connection_id: str | None = None
) -> list[Hit]:
    """The ``k`` chunks of ``collection`` nearest to ``query``, in the Postgres of ``dsn``, else of
    Airflow connection ``connection_id`` (default ``vector_store_default``).

    Raises :class:`capstone.registry.CollectionNotRegistered` when the collection was never validated there.
    """
    target_dsn = resolve_dsn(dsn, connection_id)
    with psycopg.connect(target_dsn, autocommit=True, application_name="capstone search") as conn:
        record = lookup(conn, collection)
    return search_record(target_dsn, record, query, k)


def resolve_dsn(dsn: str | None = None, connection_id: str | None = None) -> str:
    """``dsn`` as given, else the libpq connection string of Airflow connection ``connection_id``
    (default ``vector_store_default``), its TLS options included.

    Raises :class:`capstone.connections.ConnectionNotDefined` (a ``LookupError``) for an undefined
    connection.
    """
    if dsn:
        return dsn
    from capstone.connections import DEFAULT_CONNECTION_ID, postgres_dsn

    return postgres_dsn(connection_id or DEFAULT_CONNECTION_ID, attempts=1)

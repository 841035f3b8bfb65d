"""Nearest-neighbour search over a collection, through its ANN index.

ANN search runs inside :func:`ann_session`, a transaction that sets the index's query-time knob
(``hnsw.ef_search`` or ``ivfflat.probes``) with ``set_config(..., is_local => true)`` -- that is
``SET LOCAL`` with the value passed as a parameter -- and turns sequential scans off, so that even
a small table is searched through its index: what validation measures and what ``capstone search``
shows is what the index answers, not what a sequential scan would.

A search may be filtered (:class:`SearchFilter`: metadata containment, document ids). With a
filter, the index alone would return fewer than k rows (HNSW looks at ``ef_search`` candidates,
then the filter drops most of them), so the session turns on pgvector 0.8's iterative index scan
(``hnsw.iterative_scan = relaxed_order``, up to ``hnsw.max_scan_tuples``; ``ivfflat.max_probes``),
which keeps scanning until k rows pass; the relaxed order is sorted again by distance.

:class:`Searcher` is what a long-lived process (a web service) holds: the collection's record and
model loaded once, connections from a pool.

Exact neighbours, to compare the index with, come from :mod:`capstone.exact_scan` (one pass over
the table for many queries).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import TracebackType
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
    "MAX_SCAN_TUPLES",
    "SNIPPET_CHARS",
    "Hit",
    "SearchFilter",
    "SearchTarget",
    "Searcher",
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
# How many index tuples a filtered HNSW search may visit before it gives up on finding k rows
# (pgvector's default is 20,000): a filter matching 1% of 100k rows needs ~100 visits per hit.
MAX_SCAN_TUPLES = 100_000


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
    """One chunk a search returned, ``rank`` 1 first; ``distance`` as the metric's operator gives it.

    ``snippet`` is the chunk's text (its first ``SNIPPET_CHARS`` characters where the search asked
    for snippets); ``metadata`` is the chunk's metadata where the search read it.
    """

    rank: int
    chunk_id: str
    document_id: str
    chunk_index: int
    distance: float
    snippet: str
    metric: str
    metadata: dict[str, Any] | None = None

    @property
    def score(self) -> float:
        """Similarity for cosine (``1 - distance``) and inner product (``-distance``); distance for l2."""
        if self.metric == "cosine":
            return 1.0 - self.distance
        if self.metric == "inner_product":
            return -self.distance
        return self.distance

    @property
    def text(self) -> str:
        """The chunk's text as the search returned it."""
        return self.snippet


@dataclass(frozen=True)
class SearchFilter:
    """Which chunks a search may return: those whose metadata contains ``metadata`` (JSON
    containment, ``metadata @> ...``) and, when ``documents`` is given, of those documents only."""

    metadata: Mapping[str, Any] = field(default_factory=dict)
    documents: tuple[str, ...] = ()

    @classmethod
    def of(cls, value: SearchFilter | Mapping[str, Any] | None) -> SearchFilter:
        """A filter from a mapping: ``document_id`` (a string or a list) names documents, every
        other key is a metadata value to match (``{"module": "os"}``)."""
        if value is None:
            return cls()
        if isinstance(value, SearchFilter):
            return value
        metadata = {key: item for key, item in value.items() if key != "document_id"}
        documents = value.get("document_id", ())
        return cls(metadata, (documents,) if isinstance(documents, str) else tuple(documents))

    def __bool__(self) -> bool:
        return bool(self.metadata or self.documents)

    def condition(self) -> sql.Composable:
        """`` AND ...`` for the WHERE clause (values as parameters, see :meth:`params`)."""
        parts = []
        if self.metadata:
            parts.append(sql.SQL(" AND metadata @> %(filter_metadata)s::jsonb"))
        if self.documents:
            parts.append(sql.SQL(" AND document_id = ANY(%(filter_documents)s)"))
        return sql.Composed(parts)

    def params(self) -> dict[str, Any]:
        """The parameters :meth:`condition` refers to."""
        return {"filter_metadata": json.dumps(dict(self.metadata)), "filter_documents": list(self.documents)}


# -- statements -------------------------------------------------------------------------------


def ann_statement(
    target: SearchTarget, search_filter: SearchFilter | None = None, *, full_text: bool = False
) -> sql.Composed:
    """The ANN query: ``ORDER BY embedding <op> %(query)s LIMIT %(limit)s``, served by the index.

    Rows: id, document_id, chunk_index, distance, text (a snippet unless ``full_text``), metadata.
    With a filter, the index scan is iterative and its relaxed order is sorted again.
    """
    operator = sql.SQL(DISTANCE_OPERATORS[target.metric])  # from a fixed table of pgvector operators
    text = (
        sql.SQL("content") if full_text else sql.SQL("left(content, {})").format(sql.Literal(SNIPPET_CHARS))
    )
    nearest = sql.SQL(
        "SELECT id, document_id, chunk_index, embedding {op} %(query)s AS distance, {text} AS text, metadata"
        " FROM {table} WHERE embedding IS NOT NULL{condition}"
        " ORDER BY embedding {op} %(query)s LIMIT %(limit)s"
    ).format(
        op=operator,
        text=text,
        table=target.table.ident,
        condition=search_filter.condition() if search_filter else sql.SQL(""),
    )
    if not search_filter:
        return nearest
    # pgvector's recipe for relaxed_order: materialise the scan, then sort by distance again.
    return sql.SQL(
        "WITH nearest AS MATERIALIZED ({}) SELECT id, document_id, chunk_index, distance, text, metadata"
        " FROM nearest ORDER BY distance + 0"
    ).format(nearest)


# -- sessions ---------------------------------------------------------------------------------


@contextmanager
def ann_session(
    conn: psycopg.Connection, target: SearchTarget, *, iterative: bool = False
) -> Iterator[dict[str, str]]:
    """A transaction in which ANN queries go through the index with the target's ef_search/probes,
    and with ``iterative`` (filtered searches) pgvector's iterative index scan.

    Yields the settings applied; they end with the transaction, leaving the connection as it was.
    """
    name, value = target.knob
    kind = "hnsw" if target.index_type == "hnsw" else "ivfflat"
    settings = {f"{kind}.{name}": str(value), "enable_seqscan": "off"}
    if iterative:
        settings[f"{kind}.iterative_scan"] = "relaxed_order"
        if kind == "hnsw":
            settings["hnsw.max_scan_tuples"] = str(MAX_SCAN_TUPLES)
        elif target.lists:
            settings["ivfflat.max_probes"] = str(target.lists)
    with conn.transaction():
        for setting, setting_value in settings.items():
            conn.execute("SELECT set_config(%s, %s, true)", (setting, setting_value))
        yield settings


# -- searching --------------------------------------------------------------------------------


def hits_from_rows(rows: Sequence[Sequence[Any]], metric: str) -> list[Hit]:
    """Hits, ranked 1..n in row order, from rows of (id, document_id, chunk_index, distance, text)
    and, where the query read it, metadata."""
    return [
        Hit(rank, row[0], row[1], row[2], float(row[3]), row[4], metric, row[5] if len(row) > 5 else None)
        for rank, row in enumerate(rows, start=1)
    ]


def ann_search(
    conn: psycopg.Connection,
    target: SearchTarget,
    vector: np.ndarray,
    limit: int,
    search_filter: SearchFilter | None = None,
    *,
    full_text: bool = False,
) -> list[Hit]:
    """The ``limit`` nearest chunks through the index (that pass ``search_filter``); call inside
    :func:`ann_session` (``iterative=True`` when filtered)."""
    query = {"query": np.asarray(vector, dtype=np.float32), "limit": limit}
    if search_filter:
        query |= search_filter.params()
    statement = ann_statement(target, search_filter, full_text=full_text)
    return hits_from_rows(conn.execute(statement, query).fetchall(), target.metric)


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


def search_record(
    dsn: str,
    record: CollectionRecord,
    query: str,
    k: int = 5,
    search_filter: SearchFilter | None = None,
    *,
    full_text: bool = False,
) -> list[Hit]:
    """Embed ``query`` with the registered collection's model and return its ``k`` nearest chunks
    (that pass ``search_filter``; snippets of their text unless ``full_text``)."""
    vector = record.embedder().embed([query])[0]
    target, chosen = SearchTarget.of(record), search_filter or SearchFilter()
    with psycopg.connect(dsn, autocommit=True, application_name="capstone search") as conn:
        register_vector(conn)
        return _search_connection(conn, target, vector, k, chosen, full_text=full_text)


def _search_connection(
    conn: psycopg.Connection,
    target: SearchTarget,
    vector: np.ndarray,
    k: int,
    search_filter: SearchFilter,
    *,
    full_text: bool = False,
) -> list[Hit]:
    if target.index_type == "hnsw":
        # HNSW returns at most ef_search rows: a longer result list needs a longer candidate list.
        target = target.with_knob(min(MAX_EF_SEARCH, max(target.ef_search, k)))
    with ann_session(conn, target, iterative=bool(search_filter)):
        return ann_search(conn, target, vector, k, search_filter, full_text=full_text)


class Searcher:
    """Searches one collection from a long-lived process (a web service, a notebook).

    The collection's registry record and its embedding model are loaded once, at construction;
    connections come from a pool (``psycopg_pool``) of at most ``pool_size``. Thread-safe: a web
    server's threads may share one. Close it (or use it as a context manager) to close the pool.

        with Searcher("documents", dsn=...) as searcher:
            hits = searcher.search("how do I handle exceptions", k=5, filter={"topic": "try"})
    """

    def __init__(
        self,
        collection: str,
        *,
        dsn: str | None = None,
        connection_id: str | None = None,
        pool_size: int = 4,
    ) -> None:
        from psycopg_pool import ConnectionPool

        self.collection = collection
        self.pool = ConnectionPool(
            resolve_dsn(dsn, connection_id),
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "application_name": "capstone search"},
            configure=register_vector,
            open=True,
            name=f"capstone-search-{collection}",
        )
        try:
            with self.pool.connection() as conn:
                self.record = lookup(conn, collection)
            self.target = SearchTarget.of(self.record)
            self._embedder = self.record.embedder()
        except BaseException:
            self.pool.close()
            raise
        self._embed_lock = threading.Lock()  # one model, many threads: encode one query at a time

    def search(
        self, query: str, k: int = 5, *, filter: SearchFilter | Mapping[str, Any] | None = None
    ) -> list[Hit]:
        """The ``k`` chunks nearest to ``query`` that pass ``filter`` (metadata values to match, and
        ``document_id``), with their full text and metadata."""
        if not 1 <= k <= MAX_EF_SEARCH:
            raise ValueError(f"k must be between 1 and {MAX_EF_SEARCH}, got {k}")
        with self._embed_lock:
            vector = self._embedder.embed([query])[0]
        with self.pool.connection() as conn:
            return _search_connection(conn, self.target, vector, k, SearchFilter.of(filter), full_text=True)

    def close(self) -> None:
        """Close the connection pool."""
        self.pool.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def search_collection(
    collection: str,
    query: str,
    k: int = 5,
    *,
    dsn: str | None = None,
    connection_id: str | None = None,
    search_filter: SearchFilter | Mapping[str, Any] | None = None,
) -> list[Hit]:
    """The ``k`` chunks of ``collection`` nearest to ``query`` (that pass ``search_filter``), in the
    Postgres of ``dsn``, else of Airflow connection ``connection_id`` (default ``vector_store_default``).
    One call, one connection and one model lookup: a process that searches often holds a
    :class:`Searcher` instead.

    Raises :class:`capstone.registry.CollectionNotRegistered` when the collection was never validated there.
    """
    target_dsn = resolve_dsn(dsn, connection_id)
    with psycopg.connect(target_dsn, autocommit=True, application_name="capstone search") as conn:
        record = lookup(conn, collection)
    return search_record(target_dsn, record, query, k, SearchFilter.of(search_filter))


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

"""Search over a collection: by vector (its ANN index), by keyword (full text search over its
generated ``content_tsv`` column and GIN index), or hybrid (both, fused).

Modes (``SearchMode``; a collection's default is its spec's ``search.mode``):

- ``vector``: the chunks whose embeddings are nearest the query's, through the ANN index.
- ``keyword``: the chunks matching ``websearch_to_tsquery(<text_config>, query)`` (words, "quoted
  phrases", ``or``, ``-excluded``), ranked by ``ts_rank_cd``; no model is involved.
- ``hybrid``: reciprocal rank fusion of the two lists: the top ``max(k, search.candidates)`` of each, a
  chunk scoring ``1 / (search.rrf_k + rank)`` for each list it is in. One statement, one round trip.

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
model loaded once, connections from a pool of its own, on which the index settings are session
settings (:func:`apply_ann_settings`), so that a search is one round trip.

Exact neighbours, to compare the index with, come from :mod:`capstone.exact_scan` (one pass over
the table for many queries).
"""

from __future__ import annotations

import functools
import json
import math
import threading
import weakref
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
from capstone.registry import CollectionRecord, lookup, record_at_version
from capstone.settings import HNSW_EF_SEARCH, SEARCH_MODES, IndexType, Metric, SearchMode, SearchSettings
from capstone.store import TEXT_SEARCH_COLUMN, CollectionTable

__all__ = [
    "MAX_EF_SEARCH",
    "MAX_SCAN_TUPLES",
    "SNIPPET_CHARS",
    "Hit",
    "KeywordSearchUnavailable",
    "SearchFilter",
    "SearchTarget",
    "Searcher",
    "ann_search",
    "ann_session",
    "ann_settings",
    "ann_statement",
    "apply_ann_settings",
    "distinct_documents",
    "explain",
    "hits_from_rows",
    "hybrid_statement",
    "keyword_statement",
    "resolve_dsn",
    "run_search",
    "search_collection",
    "search_record",
    "similarity",
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
    # With a binary-quantized index (``index.quantization: binary``): how many candidates the index
    # returns by Hamming distance, which are then re-ranked by the full vectors. None otherwise.
    binary_rerank: int | None = None

    @classmethod
    def of(cls, record: CollectionRecord) -> SearchTarget:
        """The target of a registered collection."""
        lists = record.index_params.get("lists")
        rerank = record.index_params.get("binary_rerank")
        return cls(
            record.store_table,
            record.metric,
            record.index_type,
            record.ef_search,
            record.probes,
            lists,
            rerank,
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
    """One chunk a search returned, ``rank`` 1 first.

    ``score`` ranks the hits, higher first, as the search's ``mode`` scores them: ``vector``, the
    metric's similarity (``1 - distance`` for cosine, ``-distance`` for inner product; for l2 the
    distance itself, lower first); ``keyword``, ``ts_rank_cd``; ``hybrid``, the reciprocal-rank-fusion
    sum. ``distance`` is the query embedding's distance to the chunk (None in keyword mode, which
    embeds nothing). ``snippet`` is the chunk's text (its first ``SNIPPET_CHARS`` characters where
    the search asked for snippets); ``metadata`` is the chunk's metadata where the search read it.
    """

    rank: int
    chunk_id: str
    document_id: str
    chunk_index: int
    score: float
    distance: float | None
    snippet: str
    metric: str
    metadata: dict[str, Any] | None = None
    mode: SearchMode = "vector"

    @property
    def text(self) -> str:
        """The chunk's text as the search returned it."""
        return self.snippet

    def as_json(self) -> dict[str, Any]:
        """The hit as the CLI's ``--json`` and the Collections API show it."""
        return {
            "rank": self.rank,
            "score": self.score,
            "distance": self.distance,
            "document_id": self.document_id,
            "chunk_id": self.chunk_id,
            "chunk_index": self.chunk_index,
            "text": self.text,
            "metadata": self.metadata,
        }

    @property
    def vector_distance(self) -> float:
        """``distance``, for hits of searches that embed the query (vector, hybrid, exact scans)."""
        if self.distance is None:
            raise ValueError(f"the {self.mode} hit {self.chunk_id!r} has no vector distance")
        return self.distance


def similarity(metric: str, distance: float) -> float:
    """A vector hit's score: similarity for cosine (``1 - distance``) and inner product
    (``-distance``); the distance itself for l2."""
    if metric == "cosine":
        return 1.0 - distance
    if metric == "inner_product":
        return -distance
    return distance


class KeywordSearchUnavailable(LookupError):
    """Keyword and hybrid searches need the table's keyword column, which a table created by an
    earlier release gets on its next run."""


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


def _text(full_text: bool, alias: str = "") -> sql.Composable:
    column = sql.SQL(f"{alias}content")
    return column if full_text else sql.SQL("left({}, {})").format(column, sql.Literal(SNIPPET_CHARS))


def _distance(target: SearchTarget) -> sql.Composed:
    operator = sql.SQL(DISTANCE_OPERATORS[target.metric])  # from a fixed table of pgvector operators
    return sql.SQL("embedding {} %(query)s{}").format(operator, target.table.cast)


def _nearest(
    target: SearchTarget, search_filter: SearchFilter | None, columns: sql.Composable, limit: str
) -> sql.Composed:
    """``SELECT <columns>`` of the rows nearest ``%(query)s``, served by the index, ``LIMIT %(<limit>)s``.

    With a binary-quantized index the index serves the ``binary_rerank`` nearest by Hamming
    distance between the quantized vectors (at least ``%(<limit>)s``), which are then ordered by
    the exact distance of the full vectors.
    """
    if target.binary_rerank:
        return _nearest_by_bits(target, search_filter, columns, limit)
    return sql.SQL(
        "SELECT {columns} FROM {table} WHERE embedding IS NOT NULL{condition}"
        " ORDER BY {distance} LIMIT {limit}"
    ).format(
        columns=columns,
        table=target.table.ident,
        condition=search_filter.condition() if search_filter else sql.SQL(""),
        distance=_distance(target),
        limit=sql.Placeholder(limit),
    )


def _nearest_by_bits(
    target: SearchTarget, search_filter: SearchFilter | None, columns: sql.Composable, limit: str
) -> sql.Composed:
    bits = sql.SQL("::bit({})").format(sql.Literal(int(target.table.dimension)))
    return sql.SQL(
        "SELECT {columns} FROM (SELECT id, document_id, chunk_index, content, metadata, embedding"
        " FROM {table} WHERE embedding IS NOT NULL{condition}"
        " ORDER BY binary_quantize(embedding){bits} <~> binary_quantize(%(query)s){bits}"
        " LIMIT greatest({rerank}, {limit})) AS candidates ORDER BY {distance} LIMIT {limit}"
    ).format(
        columns=columns,
        table=target.table.ident,
        condition=search_filter.condition() if search_filter else sql.SQL(""),
        bits=bits,
        rerank=sql.Literal(int(target.binary_rerank or 0)),
        distance=_distance(target),
        limit=sql.Placeholder(limit),
    )


def ann_statement(
    target: SearchTarget, search_filter: SearchFilter | None = None, *, full_text: bool = False
) -> sql.Composed:
    """The ANN query: ``ORDER BY embedding <op> %(query)s LIMIT %(limit)s``, served by the index.

    Rows: id, document_id, chunk_index, distance, text (a snippet unless ``full_text``), metadata.
    With a filter, the index scan is iterative and its relaxed order is sorted again.
    """
    columns = sql.SQL("id, document_id, chunk_index, {} AS distance, {} AS text, metadata").format(
        _distance(target), _text(full_text)
    )
    nearest = _nearest(target, search_filter, columns, "limit")
    if not search_filter:
        return nearest
    # pgvector's recipe for relaxed_order: materialise the scan, then sort by distance again.
    return sql.SQL(
        "WITH nearest AS MATERIALIZED ({}) SELECT id, document_id, chunk_index, distance, text, metadata"
        " FROM nearest ORDER BY distance + 0"
    ).format(nearest)


def _matches(target: SearchTarget, search_filter: SearchFilter | None) -> sql.Composed:
    """FROM/WHERE of keyword matching: rows whose ``content_tsv`` matches ``%(text)s`` parsed by
    ``websearch_to_tsquery`` in ``%(text_config)s``, that pass the filter."""
    return sql.SQL(
        "FROM {table}, websearch_to_tsquery(%(text_config)s::regconfig, %(text)s) AS tsquery"
        " WHERE {tsv} @@ tsquery{condition}"
    ).format(
        table=target.table.ident,
        tsv=sql.Identifier(TEXT_SEARCH_COLUMN),
        condition=search_filter.condition() if search_filter else sql.SQL(""),
    )


def keyword_statement(
    target: SearchTarget, search_filter: SearchFilter | None = None, *, full_text: bool = False
) -> sql.Composed:
    """The keyword query: matches of ``%(text)s`` ranked by ``ts_rank_cd``, ``LIMIT %(limit)s``.

    Rows: id, document_id, chunk_index, distance (NULL), text, metadata, score.
    """
    return sql.SQL(
        "SELECT id, document_id, chunk_index, NULL::float8 AS distance, {text} AS text, metadata,"
        " ts_rank_cd({tsv}, tsquery) AS score {matches} ORDER BY score DESC, id LIMIT %(limit)s"
    ).format(
        text=_text(full_text), tsv=sql.Identifier(TEXT_SEARCH_COLUMN), matches=_matches(target, search_filter)
    )


def hybrid_statement(
    target: SearchTarget, search_filter: SearchFilter | None = None, *, full_text: bool = False
) -> sql.Composed:
    """Reciprocal rank fusion of the ``%(candidates)s`` nearest chunks and the ``%(candidates)s``
    best keyword matches: ``score = sum over the lists of 1 / (%(rrf_k)s + rank)``, ``LIMIT %(limit)s``.

    Rows: id, document_id, chunk_index, distance (of every hit, keyword-only ones included), text,
    metadata, score. Call inside :func:`ann_session` (``iterative=True`` when filtered).
    """
    return sql.SQL(
        "WITH nearest AS MATERIALIZED ({nearest}),"
        " by_vector AS (SELECT id, distance, row_number() OVER (ORDER BY distance, id) AS rank FROM nearest),"
        " by_keyword AS (SELECT id, row_number() OVER (ORDER BY ts_rank_cd({tsv}, tsquery) DESC, id) AS rank"
        " {matches} ORDER BY rank LIMIT %(candidates)s),"
        " fused AS (SELECT coalesce(v.id, k.id) AS id, v.distance,"
        " coalesce(1.0 / (%(rrf_k)s + v.rank), 0) + coalesce(1.0 / (%(rrf_k)s + k.rank), 0) AS score"
        " FROM by_vector v FULL JOIN by_keyword k ON k.id = v.id)"
        " SELECT t.id, t.document_id, t.chunk_index, coalesce(f.distance, t.{distance}),"
        " {text}, t.metadata, f.score::float8"
        " FROM fused f JOIN {table} t ON t.id = f.id ORDER BY f.score DESC, t.id LIMIT %(limit)s"
    ).format(
        nearest=_nearest(
            target, search_filter, sql.SQL("id, {} AS distance").format(_distance(target)), "candidates"
        ),
        tsv=sql.Identifier(TEXT_SEARCH_COLUMN),
        matches=_matches(target, search_filter),
        distance=_distance(target),
        text=_text(full_text, "t."),
        table=target.table.ident,
    )


# -- sessions ---------------------------------------------------------------------------------


def ann_settings(target: SearchTarget, *, iterative: bool = False) -> dict[str, str]:
    """The settings under which ANN queries go through the index with the target's
    ef_search/probes and, with ``iterative`` (filtered searches), pgvector's iterative index scan."""
    name, value = target.knob
    kind = "hnsw" if target.index_type == "hnsw" else "ivfflat"
    if target.binary_rerank:  # the index must return every candidate the re-rank asks for
        value = min(MAX_EF_SEARCH, max(value, target.binary_rerank))
    settings = {f"{kind}.{name}": str(value), "enable_seqscan": "off"}
    if iterative:
        settings[f"{kind}.iterative_scan"] = "relaxed_order"
        if kind == "hnsw":
            settings["hnsw.max_scan_tuples"] = str(MAX_SCAN_TUPLES)
        elif target.lists:
            settings["ivfflat.max_probes"] = str(target.lists)
    return settings


def _set_config(conn: psycopg.Connection, settings: Mapping[str, str], *, local: bool) -> None:
    """Apply ``settings`` in one round trip (``set_config``, values as parameters)."""
    calls = sql.SQL(", ").join(sql.SQL("set_config(%s, %s, {})").format(sql.Literal(local)) for _ in settings)
    conn.execute(sql.SQL("SELECT {}").format(calls), [item for pair in settings.items() for item in pair])


@contextmanager
def ann_session(
    conn: psycopg.Connection, target: SearchTarget, *, iterative: bool = False
) -> Iterator[dict[str, str]]:
    """A transaction under :func:`ann_settings` (``SET LOCAL``: they end with the transaction,
    leaving the connection as it was). Yields the settings applied."""
    settings = ann_settings(target, iterative=iterative)
    with conn.transaction():
        _set_config(conn, settings, local=True)
        yield settings


def apply_ann_settings(
    conn: psycopg.Connection, target: SearchTarget, applied: dict[str, str], *, iterative: bool = False
) -> None:
    """Bring the session settings of ``conn``, a connection only searches use, to
    :func:`ann_settings`; ``applied`` is what this function set on it before (updated in place).

    Unlike :func:`ann_session` this needs no transaction: a search on such a connection is one
    round trip, plus one whenever a setting changes (a filtered search after an unfiltered one).
    """
    wanted = ann_settings(target, iterative=iterative)
    kind = "hnsw" if target.index_type == "hnsw" else "ivfflat"
    wanted.setdefault(f"{kind}.iterative_scan", "off")
    changed = {name: value for name, value in wanted.items() if applied.get(name) != value}
    if changed:
        _set_config(conn, changed, local=False)
        applied.update(changed)


# -- searching --------------------------------------------------------------------------------


def hits_from_rows(rows: Sequence[Sequence[Any]], metric: str, mode: SearchMode = "vector") -> list[Hit]:
    """Hits, ranked 1..n in row order, from rows of (id, document_id, chunk_index, distance, text)
    and, where the query read them, metadata and (keyword, hybrid) the score."""
    hits = []
    for rank, row in enumerate(rows, start=1):
        distance = None if row[3] is None else float(row[3])
        metadata = row[5] if len(row) > 5 else None
        if mode == "vector":
            score = similarity(metric, distance if distance is not None else math.inf)
        else:
            score = float(row[6])
        hits.append(Hit(rank, row[0], row[1], row[2], score, distance, row[4], metric, metadata, mode))
    return hits


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


@functools.lru_cache(maxsize=256)
def _statement(
    target: SearchTarget, mode: SearchMode, by_metadata: bool, by_document: bool, full_text: bool
) -> sql.Composed:
    """The statement of a search (composed once per shape: a service sends the same few)."""
    shape = SearchFilter({"": None} if by_metadata else {}, ("",) if by_document else ())
    build = {"vector": ann_statement, "keyword": keyword_statement, "hybrid": hybrid_statement}[mode]
    return build(target, shape, full_text=full_text)


def run_search(
    conn: psycopg.Connection,
    target: SearchTarget,
    options: SearchSettings,
    mode: SearchMode,
    text: str,
    vector: np.ndarray | None,
    k: int,
    search_filter: SearchFilter | None = None,
    *,
    full_text: bool = False,
    session: dict[str, str] | None = None,
) -> list[Hit]:
    """The ``k`` best chunks for the query (``text``, embedded as ``vector`` for the vector and
    hybrid modes) in ``mode``, that pass ``search_filter``; in a transaction of its own (an
    :func:`ann_session`), or, given ``session`` (what :func:`apply_ann_settings` set on this
    connection so far), under session settings, in one round trip.

    Raises :class:`KeywordSearchUnavailable` for keyword and hybrid searches of a table that has no
    keyword column yet.
    """
    if mode not in SEARCH_MODES:
        raise ValueError(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
    chosen = search_filter or SearchFilter()
    params: dict[str, Any] = {"limit": k, "text": text, "text_config": options.text_config}
    params |= chosen.params() if chosen else {}
    if mode != "keyword":
        if vector is None:
            raise ValueError(f"a {mode} search needs the query's embedding")
        params |= {"query": np.asarray(vector, dtype=np.float32)}
    depth = k if mode == "vector" else max(k, options.candidates)
    params["candidates"], params["rrf_k"] = depth, options.rrf_k
    if target.index_type == "hnsw":
        # HNSW returns at most ef_search rows: a longer candidate list needs a longer search list.
        target = target.with_knob(min(MAX_EF_SEARCH, max(target.ef_search, depth)))
    statement = _statement(target, mode, bool(chosen.metadata), bool(chosen.documents), full_text)
    iterative = bool(chosen) and mode != "keyword"
    try:
        if session is None:
            with ann_session(conn, target, iterative=iterative):
                rows = conn.execute(statement, params).fetchall()
        else:
            apply_ann_settings(conn, target, session, iterative=iterative)
            rows = conn.execute(statement, params).fetchall()
    except psycopg.errors.UndefinedColumn as exc:
        if TEXT_SEARCH_COLUMN not in str(exc):
            raise
        raise KeywordSearchUnavailable(
            f"table {target.table.qualified} has no keyword column {TEXT_SEARCH_COLUMN!r} yet (it was "
            "created by an earlier release): its next run adds it; until then search it with mode 'vector'"
        ) from exc
    return hits_from_rows(rows, target.metric, mode)


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
    mode: SearchMode | None = None,
    full_text: bool = False,
) -> list[Hit]:
    """The ``k`` best chunks of the registered collection for ``query`` in ``mode`` (default: the
    collection's ``search.mode``), that pass ``search_filter``; snippets of their text unless
    ``full_text``. Loads the collection's model for the vector and hybrid modes."""
    chosen = mode or record.search.mode
    vector = None if chosen == "keyword" else record.embedder().embed([query])[0]
    with psycopg.connect(dsn, autocommit=True, application_name="capstone search") as conn:
        register_vector(conn)
        return run_search(
            conn,
            SearchTarget.of(record),
            record.search,
            chosen,
            query,
            vector,
            k,
            search_filter,
            full_text=full_text,
        )


class Searcher:
    """Searches one collection from a long-lived process (a web service, a notebook).

    The collection's registry record and its embedding model are loaded once, at construction
    (:meth:`refresh` reads them again); connections come from a pool (``psycopg_pool``) of at most
    ``pool_size``, on which the index settings are session settings, so that a search is one
    round trip. Behind a pooler in transaction mode (PgBouncer ``pool_mode = transaction``), where
    consecutive statements may run on different server connections, pass
    ``session_settings=False``: each search then sets them in its own transaction. Thread-safe: a
    web server's threads may share one. Close it (or use it as a context manager) to close the pool.

    After the collection switches to a new version (a new embedding model, see
    :mod:`capstone.versions`), a searcher keeps answering from the version it loaded, consistently
    (query embedding and vectors of one model), while that version is kept; :meth:`refresh` moves it
    to the live one, and a search that finds its version dropped refreshes by itself.

        with Searcher("documents", dsn=...) as searcher:
            hits = searcher.search("how do I handle exceptions", k=5, filter={"topic": "try"})
            hits = searcher.search("StopIteration", mode="keyword")

    ``schema`` picks the collection's table where its name has tables in several schemas of the
    database (two deployments sharing it); without it, such a name raises
    :class:`capstone.registry.AmbiguousCollection`.

    ``version`` pins another kept version of the collection (one being built for a new model, or a
    retired one): its chunks, searched with its own model, to compare answers before a switch.
    """

    def __init__(
        self,
        collection: str,
        *,
        schema: str | None = None,
        dsn: str | None = None,
        connection_id: str | None = None,
        pool_size: int = 4,
        session_settings: bool = True,
        version: int | None = None,
    ) -> None:
        from psycopg_pool import ConnectionPool

        self.collection = collection
        self.schema = schema
        self.version = version
        self.session_settings = session_settings
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
            self.record = self._read_record()
            self.target = SearchTarget.of(self.record)
            self._embedder = self.record.embedder()
        except BaseException:
            self.pool.close()
            raise
        self._embed_lock = threading.Lock()  # one model, many threads: encode one query at a time
        # What apply_ann_settings set on each pooled connection: its searches need no transaction.
        self._sessions: weakref.WeakKeyDictionary[psycopg.Connection, dict[str, str]] = (
            weakref.WeakKeyDictionary()
        )

    def refresh(self) -> None:
        """Read the collection's registry record again, and load its model if that changed: after
        a run changed the collection's settings (its model, index or ``search`` section)."""
        record = self._read_record()
        if record.embedding != self.record.embedding:
            self._embedder = record.embedder()
        self.record, self.target = record, SearchTarget.of(record)

    def _read_record(self) -> CollectionRecord:
        with self.pool.connection() as conn:
            live = lookup(conn, self.collection, self.schema)
            return live if self.version is None else record_at_version(conn, live, self.version)

    @property
    def mode(self) -> SearchMode:
        """The collection's default search mode (its spec's ``search.mode``)."""
        return self.record.search.mode

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        mode: SearchMode | None = None,
        filter: SearchFilter | Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        """The ``k`` best chunks for ``query`` in ``mode`` (default: the collection's) that pass
        ``filter`` (metadata values to match, and ``document_id``), with their full text and metadata."""
        if not 1 <= k <= MAX_EF_SEARCH:
            raise ValueError(f"k must be between 1 and {MAX_EF_SEARCH}, got {k}")
        chosen = mode or self.mode
        if chosen not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(SEARCH_MODES)}, got {chosen!r}")
        try:
            return self._search(query, k, chosen, SearchFilter.of(filter))
        except psycopg.errors.UndefinedTable:
            # The version this searcher read was dropped after a switch (store.keep_versions): follow
            # the collection to its live version, once.
            version = self.record.version_table
            self.refresh()
            if self.record.version_table == version:
                raise
            return self._search(query, k, chosen, SearchFilter.of(filter))

    def _search(self, query: str, k: int, chosen: SearchMode, search_filter: SearchFilter) -> list[Hit]:
        vector = None
        if chosen != "keyword":
            with self._embed_lock:
                vector = self._embedder.embed([query])[0]
        with self.pool.connection() as conn:
            return run_search(
                conn,
                self.target,
                self.record.search,
                chosen,
                query,
                vector,
                k,
                search_filter,
                full_text=True,
                session=self._sessions.setdefault(conn, {}) if self.session_settings else None,
            )

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
    mode: SearchMode | None = None,
    schema: str | None = None,
) -> list[Hit]:
    """The ``k`` best chunks of ``collection`` (its table in ``schema``, where the name has several)
    for ``query`` in ``mode`` (default: the collection's), that pass ``search_filter``, in the
    Postgres of ``dsn``, else of Airflow connection ``connection_id`` (default
    ``vector_store_default``). One call, one connection and one model lookup: a process that
    searches often holds a :class:`Searcher` instead.

    Raises :class:`capstone.registry.CollectionNotRegistered` when the collection was never validated
    there, :class:`capstone.registry.AmbiguousCollection` when its name has several tables.
    """
    target_dsn = resolve_dsn(dsn, connection_id)
    with psycopg.connect(target_dsn, autocommit=True, application_name="capstone search") as conn:
        record = lookup(conn, collection, schema)
    return search_record(target_dsn, record, query, k, SearchFilter.of(search_filter), mode=mode)


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

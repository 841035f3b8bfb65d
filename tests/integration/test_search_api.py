"""The search API a service holds (:class:`capstone.search.Searcher`): every mode, filtered
searches, on a real HNSW index and a real GIN keyword index over 20,000 chunks."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone import registry
from capstone.index_build import IndexParams, KeywordIndexParams
from capstone.registry import CollectionRecord
from capstone.search import (
    Hit,
    Searcher,
    SearchFilter,
    SearchTarget,
    ann_search,
    ann_session,
    search_collection,
)
from capstone.settings import SEARCH_MODES, CollectionSettings, SearchMode
from capstone.versions import version_settings
from tests.support.pipeline import run_pipeline
from tests.support.settings import collection_settings
from tests.support.tables import jsonl_batch

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS, CHUNKS_EACH, GROUPS = 4000, 5, 100  # 20,000 chunks; a group is 1% of them
DIMENSION = 32
QUERY = "report on subject 7 with figures"
WORDS = "report with figures"  # words every chunk has: a keyword search matches them all


def _documents() -> list[dict[str, object]]:
    return [
        {
            "id": f"d{i:05d}",
            "content": f"document {i}",
            "chunks": [
                f"report {i} part {j} on subject {i % 37} with figures {j * i % 11}" for j in range(5)
            ],
            "metadata": {"group": i % GROUPS, "parity": "even" if i % 2 == 0 else "odd"},
        }
        for i in range(DOCUMENTS)
    ]


@pytest.fixture(scope="module")
def indexed(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectionSettings]:
    """20,000 hash-embedded chunks with an HNSW index (ef_search 40), registered for search."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    name = f"search_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    settings = collection_settings(
        name, schema, embedding={"dimension": DIMENSION}, index={"ef_search": 40}, upsert_batch_size=5000
    )
    batch = jsonl_batch(tmp_path_factory.mktemp("search") / "batch.jsonl", _documents())
    version = run_pipeline(settings, f"{name}-r1", [batch])["version"]
    live = version_settings(settings, version)  # the table of the version the pipeline wrote
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(IndexParams.of(live).create_sql())
        conn.execute(KeywordIndexParams.of(live).create_sql())
        conn.execute(sql.SQL("ANALYZE {}").format(live.store_table.ident))
        registry.register(conn, CollectionRecord.from_settings(settings, version))
    yield settings
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM capstone.collections WHERE name = %s", (name,))
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.mark.parametrize("mode", SEARCH_MODES)
def test_a_filter_matching_one_percent_of_the_rows_still_returns_k_results(
    indexed: CollectionSettings, pg_dsn: str, mode: SearchMode
) -> None:
    with Searcher(indexed.collection, dsn=pg_dsn) as searcher:
        hits = searcher.search(WORDS, k=10, mode=mode, filter={"group": 7})

    assert len(hits) == 10
    assert all(hit.metadata is not None and hit.metadata["group"] == 7 for hit in hits)
    assert [hit.rank for hit in hits] == list(range(1, 11))
    assert all(hit.mode == mode and hit.text.startswith("report ") for hit in hits)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    if mode == "vector":  # the iterative scan's relaxed order, sorted again
        assert [hit.vector_distance for hit in hits] == sorted(hit.vector_distance for hit in hits)
    else:  # equal scores are ranked by chunk id
        ranking = [(-hit.score, hit.chunk_id) for hit in hits]
        assert ranking == sorted(ranking)


def test_without_the_iterative_scan_the_index_alone_returns_fewer(
    indexed: CollectionSettings, pg_dsn: str
) -> None:
    # Why the iterative scan is there: HNSW hands over ef_search candidates, and 1% of them pass.
    with Searcher(indexed.collection, dsn=pg_dsn) as searcher:
        vector = searcher.record.embedder().embed([QUERY])[0]
    target = SearchTarget.of(searcher.record)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        register_vector(conn)
        with ann_session(conn, target, iterative=False):
            plain = ann_search(conn, target, vector, 10, SearchFilter({"group": 7}))
    assert len(plain) < 10


def test_filtered_results_are_the_nearest_of_the_matching_rows(
    indexed: CollectionSettings, pg_dsn: str
) -> None:
    # Approximate search: recall is a mean over queries (one query's recall@10 varies with the
    # HNSW graph, which is built afresh each time; measured mean 0.975, lowest single query 0.8).
    recalls = []
    with Searcher(indexed.collection, dsn=pg_dsn) as searcher, psycopg.connect(pg_dsn) as conn:
        register_vector(conn)
        conn.execute("SET LOCAL enable_indexscan = off")  # exact: the HNSW index would filter its 40
        for n in range(40):
            query, wanted = f"report on subject {n} with figures {n * 3}", {"group": n % GROUPS}
            hits = searcher.search(query, k=10, mode="vector", filter=wanted)
            vector = searcher.record.embedder().embed([query])[0]
            exact = conn.execute(
                sql.SQL(
                    "SELECT id FROM {} WHERE metadata @> %s::jsonb ORDER BY embedding <=> %s LIMIT 10"
                ).format(indexed.store_table.ident),
                (json.dumps(wanted), vector),
            ).fetchall()
            assert len(hits) == 10 and all((hit.metadata or {}).get("group") == n % GROUPS for hit in hits)
            recalls.append(len({hit.chunk_id for hit in hits} & {row[0] for row in exact}) / 10)
    assert sum(recalls) / len(recalls) >= 0.9, recalls


def test_a_document_filter_returns_only_that_documents_chunks(
    indexed: CollectionSettings, pg_dsn: str
) -> None:
    with Searcher(indexed.collection, dsn=pg_dsn) as searcher:
        found = {
            mode: searcher.search(WORDS, k=8, mode=mode, filter={"document_id": ["d00042", "d00043"]})
            for mode in SEARCH_MODES
        }

    for hits in found.values():
        assert len(hits) == 8
        assert {hit.document_id for hit in hits} == {"d00042", "d00043"}


def test_keyword_search_ranks_the_matching_chunks_by_ts_rank_cd(
    indexed: CollectionSettings, pg_dsn: str
) -> None:
    query = "subject 7 -part"  # websearch syntax: "-part" excludes, and every chunk has "part"
    with Searcher(indexed.collection, dsn=pg_dsn) as searcher:
        assert searcher.search(query, k=10, mode="keyword") == []
        hits = searcher.search("subject 7 figures 3", k=10, mode="keyword")
    with psycopg.connect(pg_dsn) as conn:
        expected = conn.execute(
            sql.SQL(
                "SELECT id, ts_rank_cd(to_tsvector('english', content), q) AS rank"
                " FROM {}, websearch_to_tsquery('english', %s) AS q"
                " WHERE to_tsvector('english', content) @@ q ORDER BY rank DESC, id LIMIT 10"
            ).format(indexed.store_table.ident),
            ("subject 7 figures 3",),
        ).fetchall()

    assert len(expected) == 10
    assert [(hit.chunk_id, hit.score) for hit in hits] == [
        (row[0], pytest.approx(row[1])) for row in expected
    ]
    assert all(hit.distance is None and "subject 7 " in hit.text and "figures 3" in hit.text for hit in hits)


def test_hybrid_search_fuses_the_two_rankings_by_reciprocal_rank(
    indexed: CollectionSettings, pg_dsn: str
) -> None:
    options = indexed.search
    with Searcher(indexed.collection, dsn=pg_dsn) as searcher:
        hybrid = searcher.search(QUERY, k=10, mode="hybrid")
        by_vector = searcher.search(QUERY, k=options.candidates, mode="vector")
        by_keyword = searcher.search(QUERY, k=options.candidates, mode="keyword")

    # Hybrid ranks rows at the same distance by id (hash embeddings tie often); the index does not.
    by_vector.sort(key=lambda hit: (hit.vector_distance, hit.chunk_id))
    fused = _fuse([by_vector, by_keyword], options.rrf_k)
    assert by_vector and by_keyword and {h.chunk_id for h in by_vector} != {h.chunk_id for h in by_keyword}
    assert [hit.chunk_id for hit in hybrid] == [chunk_id for chunk_id, _ in fused[:10]]
    assert [hit.score for hit in hybrid] == [pytest.approx(score) for _, score in fused[:10]]
    assert all(hit.distance is not None for hit in hybrid)  # keyword-only hits get theirs too


def _fuse(rankings: list[list[Hit]], rrf_k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion, independently of the SQL: best first, ties by chunk id."""
    scores: dict[str, float] = {}
    for hits in rankings:
        for rank, hit in enumerate(hits, start=1):
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def test_one_searcher_answers_100_searches_on_its_pooled_connections(
    indexed: CollectionSettings, pg_dsn: str
) -> None:
    with Searcher(indexed.collection, dsn=pg_dsn, pool_size=2) as searcher:
        results = [searcher.search(f"{QUERY} {n}", k=5) for n in range(100)]
        stats = searcher.pool.get_stats()

    assert all(len(hits) == 5 for hits in results)
    assert stats["requests_num"] == 101  # the registry lookup, then one per search
    assert stats["connections_num"] <= 2  # connections opened over the whole life of the pool


@pytest.mark.local_model
@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None,
    reason="needs the [local] extra: pip install '.[local]'",
)
def test_the_model_is_loaded_once_for_100_searches(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    from capstone.embeddings import local_model, onnx_model

    settings = collection_settings("local_search", pg_schema, embedding={"provider": "sentence-transformers"})
    documents = [
        {"id": f"d{i}", "content": "x", "chunks": [f"chunk {i} about topic {i % 5}"]} for i in range(50)
    ]
    version = run_pipeline(settings, "local-search-r1", [jsonl_batch(tmp_path / "b.jsonl", documents)])[
        "version"
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(IndexParams.of(version_settings(settings, version)).create_sql())
        registry.register(conn, CollectionRecord.from_settings(settings, version))
    local_model._MODELS.clear()  # as in a new process
    onnx_model._SESSIONS.clear()
    loads = _LoadLog()
    loggers = [logging.getLogger(module.__name__) for module in (local_model, onnx_model)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(loads)  # on the logger itself: Airflow may reconfigure the root's handlers
        logger.setLevel(logging.INFO)
    try:
        with Searcher("local_search", dsn=pg_dsn) as searcher:
            results = [searcher.search(f"topic {n % 5}", k=3) for n in range(100)]
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(loads)
            logger.setLevel(level)

    assert all(len(hits) == 3 for hits in results)
    assert len(loads.messages) == 1, loads.messages
    assert len(local_model._MODELS) + len(onnx_model._SESSIONS) == 1


class _LoadLog(logging.Handler):
    """Collects the local model's "loaded ..." log lines (torch's or ONNX Runtime's)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("loaded "):
            self.messages.append(record.getMessage())


def test_the_cli_filters_and_prints_json(indexed: CollectionSettings, pg_dsn: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "capstone",
            "search",
            "--collection",
            indexed.collection,
            QUERY,
            "-k",
            "3",
            "--filter",
            "group=7",
            "--filter",
            "parity=odd",
            "--json",
            "--dsn",
            pg_dsn,
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["collection"] == indexed.collection and answer["query"] == QUERY
    assert len(answer["hits"]) == 3
    assert all(hit["metadata"] == {"group": 7, "parity": "odd"} for hit in answer["hits"])
    assert all(hit["text"].startswith("report ") for hit in answer["hits"])


def test_one_pooled_connection_switches_its_settings_between_searches(
    indexed: CollectionSettings, pg_dsn: str
) -> None:
    # The Searcher sets the index settings on its own connections once, and again only when a
    # search needs others: a filtered search must not leave the iterative scan on for the next.
    with Searcher(indexed.collection, dsn=pg_dsn, pool_size=1) as searcher:
        filtered = searcher.search(WORDS, k=10, mode="vector", filter={"group": 7})
        with searcher.pool.connection() as conn:
            after_filtered = conn.execute("SELECT current_setting('hnsw.iterative_scan')").fetchone()
        wide = searcher.search(QUERY, k=150, mode="vector")  # more than ef_search (40)
        plain = searcher.search(QUERY, k=10, mode="vector")
        with searcher.pool.connection() as conn:
            settings = conn.execute(
                "SELECT current_setting('hnsw.iterative_scan'), current_setting('hnsw.ef_search')"
            ).fetchone()
        fresh = search_collection(indexed.collection, QUERY, k=10, dsn=pg_dsn, mode="vector")

    assert len(filtered) == 10 and after_filtered == ("relaxed_order",)
    assert len(wide) == 150
    assert settings == ("off", "40")
    assert [hit.chunk_id for hit in plain] == [hit.chunk_id for hit in fresh]  # as a one-off search


def test_without_session_settings_each_search_sets_them_in_its_own_transaction(
    indexed: CollectionSettings, pg_dsn: str
) -> None:
    # For poolers in transaction mode: nothing may stay set on the server connection.
    with Searcher(indexed.collection, dsn=pg_dsn, pool_size=1, session_settings=False) as searcher:
        filtered = searcher.search(WORDS, k=10, mode="hybrid", filter={"group": 7})
        with searcher.pool.connection() as conn:
            left = conn.execute(
                "SELECT current_setting('hnsw.iterative_scan'), current_setting('enable_seqscan')"
            ).fetchone()

    assert len(filtered) == 10 and all((hit.metadata or {}).get("group") == 7 for hit in filtered)
    assert left == ("off", "on")


def test_refresh_reads_the_collections_new_search_settings(indexed: CollectionSettings, pg_dsn: str) -> None:
    with Searcher(indexed.collection, dsn=pg_dsn) as searcher:
        model = searcher._embedder
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            registry.register(
                conn,
                CollectionRecord.from_settings(replace(indexed, search=replace(indexed.search, rrf_k=10))),
            )
        try:
            searcher.refresh()
            refreshed = searcher.record.search.rrf_k
        finally:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                registry.register(conn, CollectionRecord.from_settings(indexed))

    assert refreshed == 10
    assert searcher._embedder is model  # same model: not loaded again

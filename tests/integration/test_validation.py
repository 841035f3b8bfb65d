"""Index health validation against the real embedded Postgres: every check passing, failing, warning.

The collections are written straight into their tables (hash embeddings of the Python language
reference, or clustered random vectors) and indexed with the real build coroutine, so each test
sets up in well under a second; the last test runs a whole DAG with ``dag.test()``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone import exact_scan, registry, store
from capstone.contracts import IndexEvent, UpsertResult, ValidationReport
from capstone.embeddings import create_embedder
from capstone.index_build import IndexParams, KeywordIndexParams, build_index
from capstone.local.corpus import reference_documents, write_jsonl_batch
from capstone.search import SearchTarget, ann_session, ann_statement
from capstone.settings import CollectionSettings, Metric
from capstone.validation import IndexHealthError, sample_vectors, validate_collection
from tests.support.airflow import asset_events, run_collection, task_states, write_collection
from tests.support.exact_reference import exact_connection, exact_search, exact_statement
from tests.support.settings import collection_settings, embedding_settings

DIM = 64
QUERIES = [
    {"id": "try", "query": "try statement exception handlers finally clause", "expected_document_id": "try"},
    {"id": "with", "query": "with statement context manager enter exit", "expected_document_id": "with"},
]
GHOST = {"id": "ghost", "query": "how do I summon a ghost", "expected_document_id": "no_such_topic"}


@dataclass(frozen=True)
class Collection:
    """A collection table with a valid index, and what the pipeline's tasks would hand validation."""

    dsn: str
    settings: CollectionSettings
    indexed: IndexEvent
    rows: int

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(self.settings.store.schema, self.settings.store.table)

    def validate(
        self, *, upserted: int | None = None, indexed: IndexEvent | None = None, **validation: Any
    ) -> ValidationReport:
        """Run validation as the DAG task does; ``upserted`` rows written by "this run" (default: all)."""
        spec = {"sample_queries": QUERIES, "recall_threshold": 0.9, "fail_on": ["vector_count"], **validation}
        checks = collection_settings("checks", "public", validation=spec).validation
        written: UpsertResult = {
            "run_key": "validation test",
            "upserted": self.rows if upserted is None else upserted,
            "failed": 0,
            "deleted": 0,
            "batches": 1,
            "expected_count": self.rows,
        }
        return validate_collection(
            replace(self.settings, validation=checks), written, indexed or self.indexed
        )

    def with_search(self, **search: Any) -> Collection:
        """The same collection searched in another mode (``mode="keyword"``)."""
        return replace(self, settings=replace(self.settings, search=replace(self.settings.search, **search)))

    def with_index(self, **index: Any) -> Collection:
        """The same collection searched with other query-time settings (``probes=...``)."""
        return replace(self, settings=replace(self.settings, index=replace(self.settings.index, **index)))


def _copy_rows(
    conn: psycopg.Connection, table: store.CollectionTable, rows: list[tuple], vectors: np.ndarray
) -> None:
    register_vector(conn)
    copy = sql.SQL(
        "COPY {} (id, document_id, chunk_index, content, content_hash, embedding, embedding_model)"
        " FROM STDIN (FORMAT BINARY)"
    ).format(table.ident)
    with conn.cursor().copy(copy) as writer:
        writer.set_types(["text", "text", "int4", "text", "text", "vector", "text"])
        for (chunk_id, document_id, chunk_index, content), vector in zip(rows, vectors, strict=True):
            writer.write_row((chunk_id, document_id, chunk_index, content, "hash", vector, "test"))


def _indexed_collection(
    dsn: str, settings: CollectionSettings, rows: list[tuple], vectors: np.ndarray
) -> Collection:
    table = settings.store_table
    with psycopg.connect(dsn, autocommit=True) as conn:
        store.ensure_collection_table(conn, table)
        _copy_rows(conn, table, rows, vectors)
    params, keyword = IndexParams.of(settings), KeywordIndexParams.of(settings)
    log = logging.getLogger("test.build")
    event = asyncio.run(build_index(dsn, params, len(rows), 0.1, 120.0, log, keyword))
    assert event["status"] == "success", event
    return Collection(dsn, settings, event, len(rows))


def _forget(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('capstone.collections')").fetchone()[0]:  # type: ignore[index]
            conn.execute("DELETE FROM capstone.collections WHERE name = %s", (name,))


@pytest.fixture
def reference(pg_dsn: str, pg_schema: str) -> Iterator[Collection]:
    """The language reference (733 chunks), hash-embedded, under an HNSW index; named after the schema."""
    rows = [
        (store.chunk_id(doc["id"], i), doc["id"], i, text)
        for doc in reference_documents()
        for i, text in enumerate(doc["chunks"])
    ]
    vectors = create_embedder(embedding_settings(dimension=DIM)).embed([row[3] for row in rows])
    settings = collection_settings(
        pg_schema, pg_schema, "reference", embedding={"dimension": DIM}, search={"mode": "vector"}
    )
    yield _indexed_collection(pg_dsn, settings, rows, vectors)
    _forget(pg_dsn, pg_schema)


@pytest.fixture(scope="module")
def clusters(pg_dsn: str) -> Iterator[Collection]:
    """40,000 points in 20 well-separated gaussian clusters (l2), under IVFFlat with 100 lists, probes=1."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((20, 32)).astype(np.float32) * 10
    vectors = np.repeat(centers, 2000, axis=0) + rng.standard_normal((40_000, 32)).astype(np.float32)
    rows = [
        (f"c{i // 2000}_chunk_{i % 2000}", f"c{i // 2000}", i % 2000, f"point {i}") for i in range(40_000)
    ]
    settings = collection_settings(
        schema,
        schema,
        "clusters",
        embedding={"dimension": 32},
        index={"type": "ivfflat", "metric": "l2", "lists": 100, "probes": 1},
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield _indexed_collection(pg_dsn, settings, rows, vectors)
    _forget(pg_dsn, schema)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


# -- a healthy collection ----------------------------------------------------------------------


def test_a_healthy_collection_passes_every_check(reference: Collection) -> None:
    report = reference.validate(fail_on=["vector_count", "query_relevance", "recall", "freshness"])

    summary = report["summary"]
    checks = ["vector_count", "query_relevance_try", "query_relevance_with", "recall_at_k", "index_freshness"]
    assert {name: summary[name] for name in checks} == dict.fromkeys(checks, "pass")
    assert (summary["failed"], summary["warned"], summary["ef_search"]) == ([], [], 100)
    assert summary["recall"] >= 0.9
    assert report["checks"]["vector_count"] | {"detail": None} == {
        "status": "pass",
        "value": "733/733",
        "detail": None,
        "found": 733,
        "expected": 733,
    }
    assert report["checks"]["query_relevance_try"]["rank"] == 1
    assert report["checks"]["index_freshness"]["searchable"] is True
    index = report["index"]
    assert (index["type"], index["params"], index["valid"]) == (
        "hnsw",
        {"m": 16, "ef_construction": 64},
        True,
    )
    assert index["name"] == reference.indexed["index_name"] and index["size_bytes"] > 0
    assert index["scan"] == f"Index Scan using {index['name']}"
    assert len(json.dumps(report)) < 8 * 1024  # an XCom: counts and ids, no vectors


def test_validation_registers_the_collection_for_search(reference: Collection) -> None:
    reference.validate()

    with psycopg.connect(reference.dsn) as conn:
        record = registry.lookup(conn, reference.settings.collection)
    assert (record.schema, record.table, record.provider, record.model, record.dimension) == (
        reference.settings.store.schema,
        "reference",
        "hash",
        "hash-v1",
        DIM,
    )
    assert (record.metric, record.index_type, record.ef_search) == ("cosine", "hnsw", 100)
    assert record.index_name == reference.indexed["index_name"]
    assert record.search == reference.settings.search
    assert record.last_validation is not None and record.last_validation["failed"] == []


@pytest.mark.parametrize("mode", ["keyword", "hybrid"])
def test_sample_queries_run_in_the_collections_search_mode_and_report_it(
    reference: Collection, mode: str
) -> None:
    report = reference.with_search(mode=mode).validate()

    assert report["summary"]["search_mode"] == report["search"]["mode"] == mode
    for query in QUERIES:
        check = report["checks"][f"query_relevance_{query['id']}"]
        assert check["mode"] == mode and f"({mode} search)" in check["detail"]
        if mode == "keyword":
            assert check["top_documents"] == _keyword_documents(reference, query["query"])[:5]
    keyword_index = report["index"]["keyword_index"]
    assert keyword_index["name"] == reference.indexed["keyword_index_name"] and keyword_index["valid"]


def _keyword_documents(collection: Collection, query: str) -> list[str]:
    """Documents in the order of their best chunk's ts_rank_cd for ``query``, straight from SQL."""
    with psycopg.connect(collection.dsn) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT document_id FROM {}, websearch_to_tsquery('english', %s) AS q"
                " WHERE to_tsvector('english', content) @@ q"
                " ORDER BY ts_rank_cd(to_tsvector('english', content), q) DESC, id"
            ).format(collection.table),
            (query,),
        ).fetchall()
    return list(dict.fromkeys(row[0] for row in rows))


def test_sample_queries_run_only_when_their_answers_may_have_changed(reference: Collection) -> None:
    steady: IndexEvent = {**reference.indexed, "builds_started": 0}  # the index was there already

    def validate(**options: Any) -> ValidationReport:
        return reference.validate(**{"indexed": steady, **options})

    def plan(report: ValidationReport) -> tuple[bool, str]:
        queries = report["summary"]["query_checks"]
        return queries["ran"], queries["reason"]

    full = validate()  # every row written: the queries run
    assert plan(full)[0] and full["summary"]["query_relevance_try"] == "pass"

    small = validate(upserted=3)  # 3 of 733 rows: same version, index and queries
    ran, reason = plan(small)
    assert not ran and "3 of 733 rows changed" in reason, reason
    assert small["summary"]["query_relevance_try"] == "skip"
    assert small["checks"]["query_relevance_try"]["detail"].startswith("not run this time")
    assert small["summary"]["query_checks"]["runs_since"] == 1
    assert small["summary"]["recall_at_k"] == "pass"  # recall needs no model: it still runs

    assert plan(validate(upserted=3, query_checks_every=2)) == (
        True,
        "every 2 validations (validation.query_checks_every)",
    )
    assert plan(validate(upserted=3, query_checks="always"))[0]
    assert plan(validate(upserted=40, query_checks_changed_fraction=0.05)) == (
        True,
        "40 of 733 rows changed",
    )
    assert plan(validate(upserted=3, indexed={**reference.indexed, "builds_started": 1})) == (
        True,
        "the index was built",
    )
    assert not plan(validate(upserted=3))[0]

    with_ghost = [*QUERIES, GHOST]  # a changed query list, and a query that cannot pass
    assert plan(validate(upserted=3, sample_queries=with_ghost)) == (
        True,
        "the sample queries, the search settings or the model changed",
    )
    assert plan(validate(upserted=3, sample_queries=with_ghost)) == (
        True,
        "a sample query did not pass the last time they ran",
    )


def test_the_recall_sample_is_the_same_on_every_run(reference: Collection) -> None:
    target = SearchTarget(reference.settings.store_table, "cosine", "hnsw", ef_search=100, probes=10)
    with psycopg.connect(reference.dsn, autocommit=True) as conn:
        register_vector(conn)
        first, second = sample_vectors(conn, target, 20), sample_vectors(conn, target, 20)

    assert len(first) == 20 and len({chunk_id for chunk_id, _ in first}) == 20
    assert [chunk_id for chunk_id, _ in first] == [chunk_id for chunk_id, _ in second]
    np.testing.assert_array_equal(np.stack([v for _, v in first]), np.stack([v for _, v in second]))


def test_the_ann_query_uses_the_index_and_the_exact_query_does_not(reference: Collection) -> None:
    target = SearchTarget(reference.settings.store_table, "cosine", "hnsw", ef_search=100, probes=10)
    query = {"query": np.ones(DIM, dtype=np.float32), "limit": 10}
    index_name = reference.indexed["index_name"]

    with psycopg.connect(reference.dsn, autocommit=True) as conn:
        register_vector(conn)
        with ann_session(conn, target) as settings:
            ann_plan = _plan(conn, ann_statement(target), query)
    with exact_connection(reference.dsn) as exact:
        exact_plan = _plan(exact, exact_statement(target), query)

    assert settings == {"hnsw.ef_search": "100", "enable_seqscan": "off"}
    assert f"Index Scan using {index_name}" in ann_plan
    assert index_name not in exact_plan and "Seq Scan" in exact_plan, exact_plan


@pytest.mark.parametrize("metric", ["cosine", "l2", "inner_product"])
def test_exact_search_returns_the_nearest_rows_with_their_own_details(
    reference: Collection, metric: Metric
) -> None:
    target = SearchTarget(reference.settings.store_table, metric, "hnsw", ef_search=100, probes=10)
    with psycopg.connect(reference.dsn, autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute(
            sql.SQL("SELECT id, document_id, chunk_index, left(content, 300), embedding FROM {}").format(
                reference.table
            )
        ).fetchall()
    details = {row[0]: row[1:4] for row in rows}
    ids = [row[0] for row in rows]
    matrix = np.stack([store.stored_vector(row[4]) for row in rows]).astype(np.float64)
    queries = [matrix[7], matrix[300] * 0.5 + matrix[301] * 0.5, np.linspace(-1, 1, DIM)]

    with exact_connection(reference.dsn) as exact:
        found = [exact_search(exact, target, query.astype(np.float32), 10) for query in queries]

    for query, hits in zip(queries, found, strict=True):
        truth = dict(zip(ids, _distances(matrix, query, metric), strict=True))
        tenth = sorted(truth.values())[9]
        assert [hit.rank for hit in hits] == list(range(1, 11))
        assert [hit.vector_distance for hit in hits] == sorted(hit.vector_distance for hit in hits)
        for hit in hits:
            assert (hit.document_id, hit.chunk_index, hit.snippet) == details[hit.chunk_id]
            assert hit.distance == pytest.approx(truth[hit.chunk_id], abs=1e-5)
            assert hit.distance <= tenth + 1e-5, "a nearer row was skipped"


@pytest.mark.parametrize("metric", ["cosine", "l2", "inner_product"])
def test_one_pass_exact_neighbours_match_exact_search_for_every_query(
    reference: Collection, metric: Metric, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exact_scan, "_BLOCK_ROWS", 100)  # 733 rows: several blocks and a last, short one
    target = SearchTarget(reference.settings.store_table, metric, "hnsw", ef_search=100, probes=10)
    with psycopg.connect(reference.dsn, autocommit=True) as conn:
        register_vector(conn)
        sample = sample_vectors(conn, target, 12)
        queries = [vector for _, vector in sample] + [np.linspace(-1, 1, DIM, dtype=np.float32)]
        found = exact_scan.exact_neighbours(conn, target, queries, 11)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with exact_connection(reference.dsn) as exact:
        expected = [exact_search(exact, target, query, 11) for query in queries]

    for hits, want in zip(found, expected, strict=True):
        assert [hit.rank for hit in hits] == list(range(1, 12))
        assert [hit.distance for hit in hits] == [hit.distance for hit in want]  # pgvector's own values
        # Rows tied at the 11th distance are interchangeable: either side may have picked any of them.
        tied = {h.chunk_id for h in [*hits, *want] if h.distance == want[-1].distance}
        assert {h.chunk_id for h in hits} - tied == {h.chunk_id for h in want} - tied
        details = {w.chunk_id: replace(w, rank=0) for w in want}
        assert all(replace(hit, rank=0) == details.get(hit.chunk_id, replace(hit, rank=0)) for hit in hits)


def _distances(matrix: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    if metric == "l2":
        return np.linalg.norm(matrix - query, axis=1)
    if metric == "inner_product":
        return -(matrix @ query)
    return 1 - (matrix @ query) / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))


def _plan(conn: psycopg.Connection, statement: sql.Composed, params: dict[str, Any]) -> str:
    return "\n".join(row[0] for row in conn.execute(sql.SQL("EXPLAIN {}").format(statement), params))


# -- vector_count ------------------------------------------------------------------------------


def test_deleting_rows_fails_vector_count(reference: Collection) -> None:
    with psycopg.connect(reference.dsn, autocommit=True) as conn:
        deleted = conn.execute(
            sql.SQL("DELETE FROM {} WHERE document_id = 'with'").format(reference.table)
        ).rowcount

    with pytest.raises(IndexHealthError, match=r"vector_count failed") as failure:
        reference.validate()

    message = str(failure.value)
    assert f"{reference.rows - deleted} rows with embeddings, {reference.rows} expected" in message
    assert f"{deleted} missing" in message
    assert "check  " in message and "vector_count" in message  # the table is in the message


# -- query_relevance ---------------------------------------------------------------------------


def test_a_sample_query_whose_document_is_absent_fails_query_relevance(reference: Collection) -> None:
    with pytest.raises(IndexHealthError, match=r"query_relevance_ghost failed") as failure:
        reference.validate(sample_queries=[*QUERIES, GHOST], fail_on=["vector_count", "query_relevance"])

    assert "'no_such_topic' has no rows in" in str(failure.value)


def test_a_failing_check_not_in_fail_on_only_warns(reference: Collection) -> None:
    report = reference.validate(sample_queries=[*QUERIES, GHOST], fail_on=["vector_count"])

    ghost = report["checks"]["query_relevance_ghost"]
    assert (ghost["status"], ghost["rank"], len(ghost["top_documents"])) == ("warn", None, 5)
    assert report["summary"]["warned"] == ["query_relevance_ghost"]
    assert report["summary"]["failed"] == []


def test_a_document_below_top_k_fails_and_reports_the_rank_found(reference: Collection) -> None:
    query = {**QUERIES[1], "id": "with_top1"}  # 'with' is found, but not first

    report = reference.validate(sample_queries=[query], top_k=1)

    check = report["checks"]["query_relevance_with_top1"]
    assert check["status"] == "warn" and check["rank"] > 1
    assert f"found at rank {check['rank']}" in check["detail"]


# -- recall_at_k -------------------------------------------------------------------------------


def test_ivfflat_with_one_probe_on_clustered_data_fails_recall(clusters: Collection) -> None:
    with pytest.raises(IndexHealthError, match=r"recall_at_k failed") as failure:
        clusters.validate(sample_queries=[], fail_on=["vector_count", "recall"])

    assert "with probes=1, under the threshold 0.9: raise index.probes to" in str(failure.value)


def test_low_recall_only_warns_when_recall_is_not_in_fail_on(clusters: Collection) -> None:
    report = clusters.validate(sample_queries=[], fail_on=["vector_count"])

    recall = report["checks"]["recall_at_k"]
    assert recall["status"] == "warn" and recall["recall"] < 0.9
    assert (recall["probes"], recall["k"], recall["sample_size"]) == (1, 10, 50)
    suggested = int(recall["suggestion"].split("raise index.probes to ")[1].split()[0])
    assert 1 < suggested <= 100
    summary = report["summary"]
    assert (summary["recall_at_k"], summary["recall"], summary["probes"]) == ("warn", recall["recall"], 1)
    raised = clusters.with_index(probes=suggested)
    assert raised.validate(sample_queries=[], fail_on=["recall"])["summary"]["recall"] >= 0.9


def test_a_missing_index_fails_recall_and_freshness(reference: Collection) -> None:
    with psycopg.connect(reference.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP INDEX {}").format(
                sql.Identifier(reference.settings.store.schema, reference.indexed["index_name"])
            )
        )

    report = reference.validate()

    assert report["index"]["exists"] is False
    for check in ("recall_at_k", "index_freshness"):
        assert report["checks"][check]["status"] == "warn"
        assert "does not exist: searches scan the whole table" in report["checks"][check]["detail"]


# -- index_freshness ---------------------------------------------------------------------------


def test_revalidating_an_unchanged_collection_is_fresh_however_old_its_rows(reference: Collection) -> None:
    with psycopg.connect(reference.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET updated_at = now() - interval '2 days'").format(reference.table))

    report = reference.validate(upserted=0, freshness_limit_seconds=60, fail_on=["freshness"])

    freshness = report["checks"]["index_freshness"]
    assert (freshness["status"], freshness["searchable"], freshness["lag_ms"]) == ("pass", True, None)
    assert freshness["age_ms"] >= 2 * 86_400_000
    assert "this run wrote no rows" in freshness["detail"]


def test_rows_that_became_searchable_late_fail_freshness(reference: Collection) -> None:
    late: IndexEvent = {**reference.indexed, "freshness_ms": 2 * 3_600_000}  # seen 2 h after the write

    on_time = reference.validate(freshness_limit_seconds=3600, fail_on=["freshness"])
    with pytest.raises(IndexHealthError, match=r"index_freshness failed") as failure:
        reference.validate(indexed=late, freshness_limit_seconds=3600, fail_on=["freshness"])

    assert on_time["checks"]["index_freshness"]["lag_ms"] == reference.indexed["freshness_ms"]

    assert "searchable 2.0 h after it was written (limit 1.0 h)" in str(failure.value)


# -- in the DAG --------------------------------------------------------------------------------


@pytest.mark.usefixtures("airflow_db")
def test_a_failed_validation_publishes_no_indexed_asset(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    documents = [doc for doc in reference_documents() if doc["id"] in ("try", "with", "yield")]
    batch = write_jsonl_batch(documents, tmp_path / "batch.jsonl")
    spec = write_collection(
        tmp_path / "configs",
        "val_fails",
        pg_schema,
        validation={"sample_queries": [GHOST], "fail_on": ["query_relevance"]},
    )
    events_before = len(asset_events("val_fails.indexed"))
    try:
        run = run_collection(spec, [{"format": "jsonl", "path": str(batch)}])
    finally:
        _forget(pg_dsn, "val_fails")

    states = task_states("val_fails", run.run_id)
    assert str(run.state) == "failed", states
    assert states["wait_for_indexing"] == ["success"]
    assert states["validate_index_health"] == ["failed"]
    assert states["publish_indexed_asset"] == ["upstream_failed"]
    assert len(asset_events("val_fails.indexed")) == events_before

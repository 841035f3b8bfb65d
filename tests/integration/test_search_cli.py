"""``python -m capstone search`` end to end, in a subprocess, on a collection indexed by ``dag.test()``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from capstone.local.corpus import reference_documents, write_jsonl_batch
from capstone.search import search_collection
from tests.support.airflow import asset_events, run_collection, task_states, write_collection, xcom_value
from tests.support.stacks import TEST_DATABASE
from tests.support.versions import live_table

pytestmark = pytest.mark.usefixtures("airflow_db")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COLLECTION = "cli_reference"
KNOWN_QUERY = "try statement exception handlers finally clause"


@dataclass(frozen=True)
class IndexedRun:
    """The collection's DAG run that indexed the language reference with the hash provider."""

    run_id: str
    state: str
    schema: str


@pytest.fixture(scope="module")
def indexed(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IndexedRun]:
    folder = tmp_path_factory.mktemp("search_cli")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    batch = write_jsonl_batch(reference_documents(), folder / "reference.jsonl")
    spec = write_collection(
        folder / "configs",
        COLLECTION,
        schema,
        validation={
            "sample_queries": [{"id": "try", "query": KNOWN_QUERY, "expected_document_id": "try"}],
            "fail_on": ["vector_count", "query_relevance", "recall", "freshness"],
        },
        search={"mode": "vector"},  # the known answer is the hash embeddings'; other modes by --mode
    )
    run = run_collection(spec, [{"format": "jsonl", "path": str(batch)}])
    yield IndexedRun(run.run_id, str(run.state), schema)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM capstone.collections WHERE name = %s", (COLLECTION,))
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def search(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m capstone search ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "capstone", "search", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env or os.environ.copy(),
    )


def results(output: str) -> list[list[str]]:
    """The result rows of the search output: ``[rank, score, document, chunk, snippet...]``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "score"])
    return [line.split() for line in lines[start + 1 :]]


def test_the_dag_run_validates_the_collection_and_publishes_the_summary(indexed: IndexedRun) -> None:
    assert indexed.state == "success", task_states(COLLECTION, indexed.run_id)
    report: dict[str, Any] = xcom_value(COLLECTION, indexed.run_id, "validate_index_health")
    summary = report["summary"]

    assert {summary[check] for check in report["checks"]} == {"pass"}
    assert asset_events(f"{COLLECTION}.indexed")[-1]["validation"] == summary


def test_search_prints_the_document_that_answers_a_known_query(indexed: IndexedRun, pg_dsn: str) -> None:
    completed = search("--collection", COLLECTION, KNOWN_QUERY, "-k", "3", "--dsn", pg_dsn)

    assert completed.returncode == 0, completed.stderr
    header = completed.stdout.splitlines()[0]
    assert header.startswith(f"{COLLECTION} ({indexed.schema}.{COLLECTION}): 3 best chunks for ")
    assert "[vector search: hash hash-v1, hnsw cosine ef_search=100; score = similarity]" in header
    rows = results(completed.stdout)
    assert [row[0] for row in rows] == ["1", "2", "3"]
    _rank, score, document, chunk, *snippet = rows[0]
    assert (document, chunk.startswith("try_chunk_")) == ("try", True)
    assert 0 < float(score) <= 1 and float(rows[1][1]) <= float(score)
    assert snippet


def test_the_trigger_built_the_keyword_index_beside_the_vector_index(
    indexed: IndexedRun, pg_dsn: str
) -> None:
    event: dict[str, Any] = xcom_value(COLLECTION, indexed.run_id, "wait_for_indexing")
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname, am.amname, i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam"
            " WHERE i.indrelid = %s::regclass",
            (f"{indexed.schema}.{live_table(pg_dsn, indexed.schema, COLLECTION)}",),
        ).fetchall()
    indexes = {name: (method, valid, definition) for name, method, valid, definition in rows}

    assert event["status"] == "success" and event["builds_started"] == 2  # keyword, then vector
    method, valid, definition = indexes[event["keyword_index_name"]]
    assert (method, valid) == ("gin", True) and definition.endswith("USING gin (content_tsv)")
    assert indexes[event["index_name"]][:2] == ("hnsw", True)
    assert event["keyword_index_size_bytes"] > 0


def test_search_in_keyword_and_hybrid_mode_prints_json_with_the_mode(
    indexed: IndexedRun, pg_dsn: str
) -> None:
    outputs = {
        mode: search("--collection", COLLECTION, "StopIteration", "--mode", mode, "--json", "--dsn", pg_dsn)
        for mode in ("keyword", "hybrid")
    }

    documents = {mode: json.loads(completed.stdout) for mode, completed in outputs.items()}
    for mode, completed in outputs.items():
        assert completed.returncode == 0, completed.stderr
        assert documents[mode]["mode"] == mode
        scores = [hit["score"] for hit in documents[mode]["hits"]]
        assert scores == sorted(scores, reverse=True)
    with psycopg.connect(pg_dsn) as conn:
        matching = conn.execute(
            sql.SQL(
                "SELECT id FROM {}"
                " WHERE to_tsvector('english', content) @@ websearch_to_tsquery('english', %s)"
            ).format(sql.Identifier(indexed.schema, COLLECTION)),
            ("StopIteration",),
        ).fetchall()
    keyword_hits, hybrid_hits = documents["keyword"]["hits"], documents["hybrid"]["hits"]
    assert 0 < len(matching) < 5  # fewer chunks name it than -k asks for
    assert {hit["chunk_id"] for hit in keyword_hits} == {row[0] for row in matching}
    assert all(hit["distance"] is None and "StopIteration" in hit["text"] for hit in keyword_hits)
    assert len(hybrid_hits) == 5  # the vector list fills in
    assert all(hit["distance"] is not None for hit in hybrid_hits)
    assert keyword_hits[0]["chunk_id"] in {hit["chunk_id"] for hit in hybrid_hits}


def test_search_prints_the_mode_and_how_it_ranked(indexed: IndexedRun, pg_dsn: str) -> None:
    completed = search("--collection", COLLECTION, "finally clause", "--mode", "hybrid", "--dsn", pg_dsn)

    assert completed.returncode == 0, completed.stderr
    header = completed.stdout.splitlines()[0]
    assert (
        "[hybrid search: hash hash-v1 + full text english, rrf_k=60; score = reciprocal rank fusion]"
        in header
    )


def test_search_finds_the_collection_through_the_default_connection(indexed: IndexedRun) -> None:
    # No --dsn: vector_store_default, which the test session exports as AIRFLOW_CONN_VECTOR_STORE_DEFAULT.
    completed = search("--collection", COLLECTION, *KNOWN_QUERY.split())  # unquoted words: one query

    assert completed.returncode == 0, completed.stderr
    assert results(completed.stdout)[0][2] == "try"
    assert len(results(completed.stdout)) == 5


def test_search_collection_answers_in_process_through_the_default_connection(indexed: IndexedRun) -> None:
    hits = search_collection(COLLECTION, KNOWN_QUERY, k=3)

    assert [hit.rank for hit in hits] == [1, 2, 3]
    assert hits[0].document_id == "try" and hits[0].chunk_id.startswith("try_chunk_")
    assert hits[0].score == pytest.approx(1 - hits[0].vector_distance)


def test_searching_a_collection_never_indexed_says_which_dag_to_run(indexed: IndexedRun, pg_dsn: str) -> None:
    completed = search("--collection", "never_indexed", "anything", "--dsn", pg_dsn)

    assert completed.returncode == 1
    assert completed.stdout == ""
    assert "collection 'never_indexed' is not indexed yet" in completed.stderr
    assert "run its Airflow DAG 'never_indexed'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_search_with_no_connection_defined_reads_the_running_embedded_postgres_and_says_so(
    indexed: IndexedRun,
) -> None:
    env = {key: value for key, value in os.environ.items() if key != "AIRFLOW_CONN_VECTOR_STORE_DEFAULT"}
    env["CAPSTONE_PG_DATABASE"] = TEST_DATABASE  # where the tests index; the user's default is vectors

    completed = search("--collection", COLLECTION, KNOWN_QUERY, env=env)

    assert completed.returncode == 0, completed.stderr
    assert "note: Airflow connection 'vector_store_default' is not defined: searching the project's " in (
        completed.stderr
    )
    assert results(completed.stdout)[0][2] == "try"


def test_search_through_an_undefined_connection_says_how_to_define_it(indexed: IndexedRun) -> None:
    completed = search("--collection", COLLECTION, "anything", "--connection", "nowhere")

    assert completed.returncode == 1 and completed.stdout == ""
    assert "Airflow connection 'nowhere' is not defined" in completed.stderr
    assert "AIRFLOW_CONN_NOWHERE" in completed.stderr and "--dsn" in completed.stderr


def test_a_collection_registered_before_the_task_settings_existed_is_still_searched(
    indexed: IndexedRun, pg_dsn: str
) -> None:
    task_only = ["parallel_tasks", "pool_slots", "concurrent_tasks", "device", "threads"]
    task_only += ["max_concurrent_requests", "max_tokens_per_request"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # What the previous release wrote: the embedding options without the task settings.
        conn.execute(
            "UPDATE capstone.collections SET embedding_options = embedding_options - %s::text[]"
            " WHERE name = %s",
            (task_only, COLLECTION),
        )
        row = conn.execute(
            "SELECT embedding_options FROM capstone.collections WHERE name = %s", (COLLECTION,)
        ).fetchone()
    assert row is not None and not set(task_only) & set(row[0])

    hits = search_collection(COLLECTION, KNOWN_QUERY, k=3, dsn=pg_dsn)

    assert hits[0].document_id == "try"

"""Terminal errors fail a task on its first try; transient ones are retried (under ``dag.test()``).

Every collection here has retries to spare, so a try number of 1 on a failed task means the
retries were skipped on purpose, not used up.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from capstone.local.embedded_pg import EmbeddedPostgres
from tests.support.airflow import asset_events, run_collection, task_states, try_numbers, write_collection
from tests.support.fake_openai import FaultPlanServer
from tests.support.postgres import PRIVATE_CONNECTION_ID
from tests.support.tables import assert_table_holds_exactly, jsonl_batch, stored_chunks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]

RETRIES = {"retries": 3, "retry_delay_seconds": 0}


def _documents(count: int, version: int = 1, chunks: int = 4) -> list[dict[str, Any]]:
    return [
        {
            "id": f"doc-{i:04d}",
            "content": f"document {i} v{version}",
            "chunks": [f"document {i} chunk {j} version {version}" for j in range(chunks)],
            "metadata": {"version": version},
        }
        for i in range(count)
    ]


def _table_exists(dsn: str, schema: str, table: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (f'"{schema}"."{table}"',)).fetchone()
    return row is not None and row[0] is not None


def test_a_missing_batch_file_fails_the_load_on_its_first_try(
    tmp_path: Path, pg_dsn: str, pg_schema: str, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = write_collection(tmp_path / "configs", "missing_batch", pg_schema, dag=RETRIES)
    missing = tmp_path / "batches" / "0042.jsonl"

    run = run_collection(spec, [{"format": "jsonl", "path": str(missing)}])
    logs = "".join(capfd.readouterr())

    assert str(run.state) == "failed"
    assert try_numbers("missing_batch", run.run_id, "load_enriched_documents") == [1]
    assert f"batch file {missing} does not exist" in logs
    assert not _table_exists(pg_dsn, pg_schema, "missing_batch")


def test_an_unknown_batch_format_fails_the_load_on_its_first_try(
    tmp_path: Path, pg_dsn: str, pg_schema: str, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = write_collection(tmp_path / "configs", "csv_batch", pg_schema, dag=RETRIES)

    run = run_collection(spec, [{"format": "csv", "path": str(tmp_path / "b.csv")}])
    logs = "".join(capfd.readouterr())

    assert str(run.state) == "failed"
    assert try_numbers("csv_batch", run.run_id, "load_enriched_documents") == [1]
    assert "unknown batch format 'csv'" in logs


def test_a_wrong_api_key_fails_every_mapped_batch_on_its_first_try(
    tmp_path: Path,
    pg_dsn: str,
    pg_schema: str,
    faulty_openai: FaultPlanServer,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-the-right-key")
    spec = write_collection(
        tmp_path / "configs",
        "wrong_key",
        pg_schema,
        embedding={
            "provider": "openai",
            "model": "text-embedding-3-small",
            "dimension": 64,
            "base_url": faulty_openai.base_url,
            "batch_size": 40,
            "retries": 3,
            "retry_delay_seconds": 0,
        },
    )

    run = run_collection(spec, [jsonl_batch(tmp_path / "batch.jsonl", _documents(40))])
    logs = "".join(capfd.readouterr())

    assert str(run.state) == "failed"
    assert try_numbers("wrong_key", run.run_id, "generate_embedding") == [1, 1, 1, 1]  # 160 chunks / 40
    # One request per batch: neither the client nor Airflow asked again.
    assert [request.status for request in faulty_openai.embedding_requests()] == [401] * 4
    assert "API key" in logs
    assert stored_chunks(pg_dsn, pg_schema, "wrong_key")[0] == {}


def test_a_failed_fail_on_check_fails_validation_on_its_first_try(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    spec = write_collection(
        tmp_path / "configs",
        "ghost_query",
        pg_schema,
        validation={
            "sample_queries": [{"id": "ghost", "query": "anything", "expected_document_id": "no-such-doc"}],
            "fail_on": ["query_relevance"],
        },
        dag=RETRIES,
    )

    run = run_collection(spec, [jsonl_batch(tmp_path / "batch.jsonl", _documents(5))])

    assert str(run.state) == "failed"
    assert try_numbers("ghost_query", run.run_id, "validate_index_health") == [1]
    assert asset_events("ghost_query.indexed") == []


# -- a transient fault: Postgres restarted while the upsert merges -----------------------------------


def _merge_waiting_on_lock(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%'"
        ).fetchone()
    return bool(row and row[0])


def _restart_when_a_merge_waits(server: EmbeddedPostgres, restarted: threading.Event) -> None:
    deadline = time.monotonic() + 240
    while not _merge_waiting_on_lock(server.uri()):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    server.stop()  # fast shutdown: every connection, the locking one too, is terminated
    server.start()
    restarted.set()


def test_a_postgres_restart_mid_upsert_is_retried_to_exact_rows(
    tmp_path: Path, running_private_pg: EmbeddedPostgres
) -> None:
    server = running_private_pg
    with psycopg.connect(server.uri(), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS restart_mid_upsert CASCADE")
    spec = write_collection(
        tmp_path / "configs",
        "restarted",
        "restart_mid_upsert",
        store={"connection_id": PRIVATE_CONNECTION_ID, "schema": "restart_mid_upsert", "table": "restarted"},
        upsert_batch_size=100,
        # A loaded machine may take seconds to stop and start the server: tries without a delay
        # could all land while it is still shutting down.
        dag={"retries": 4, "retry_delay_seconds": 2},
    )
    v1, v2 = _documents(200, version=1), _documents(200, version=2)
    first = run_collection(spec, [jsonl_batch(tmp_path / "v1.jsonl", v1)])
    assert str(first.state) == "success", task_states("restarted", first.run_id)

    restarted = threading.Event()
    blocker = psycopg.connect(server.uri())  # holds a row lock the merge waits on; the stop kills it
    blocker.execute("SELECT 1 FROM restart_mid_upsert.restarted WHERE id = 'doc-0150_chunk_1' FOR UPDATE")
    watcher = threading.Thread(target=_restart_when_a_merge_waits, args=(server, restarted))
    watcher.start()
    try:
        second = run_collection(spec, [jsonl_batch(tmp_path / "v2.jsonl", v2)])
    finally:
        watcher.join(timeout=60)
        blocker.close()

    assert restarted.is_set(), "the merge never waited on the lock"
    assert str(second.state) == "success", task_states("restarted", second.run_id)
    # Retried until the server was back (a try during the restart finds it down: retried too).
    assert try_numbers("restarted", second.run_id, "batch_upsert_vectors")[0] >= 2
    assert_table_holds_exactly(
        server.uri(), "restart_mid_upsert", "restarted", v2, model="hash-v1", dimension=64
    )

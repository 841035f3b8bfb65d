"""Postgres stopped in the middle of ``batch_upsert_vectors``, then started again.

These tests stop a private server (``private_pg``), never the shared one. The upsert runs in a
thread; a row lock held by the test parks one merge transaction mid-way, so the stop lands inside
a merge for certain, not between two (the other connection merging at the same time may finish
more spans meanwhile). Whatever happens, the table never shows part of a batch, and the retry (or
a re-run) ends with exactly the new version of every document.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from capstone import store
from capstone.local.embedded_pg import EmbeddedPostgres
from capstone.pipeline import run_key_for, upsert_vectors
from capstone.settings import CollectionSettings
from tests.support.pipeline import run_pipeline, run_until_upsert
from tests.support.postgres import PRIVATE_CONNECTION_ID
from tests.support.settings import collection_settings
from tests.support.tables import assert_table_holds_exactly, jsonl_batch, stored_chunks

pytestmark = pytest.mark.slow

DIMENSION = 32
UPSERT_BATCH = 100
LOCKED_SPAN = 3  # the merge of the 4th span (0-based 3) is the one the stop interrupts


def _settings(schema: str) -> CollectionSettings:
    return collection_settings(
        schema,
        schema,
        "chunks",
        embedding={"dimension": DIMENSION, "batch_size": 5000},
        store={"connection_id": PRIVATE_CONNECTION_ID},
        upsert_batch_size=UPSERT_BATCH,
    )


def _version(number: int, documents: int) -> list[dict[str, Any]]:
    """Version 2 changes every chunk, drops two chunks of every fifth document and adds documents."""
    result = []
    for i in range(documents):
        chunks = 4 if number == 1 or i % 5 else 2
        result.append(
            {
                "id": f"doc-{i:04d}",
                "content": f"document {i} v{number}",
                "chunks": [f"document {i} chunk {j} version {number}" for j in range(chunks)],
                "metadata": {"version": number},
            }
        )
    return result


V1 = _version(1, 300)
V2 = _version(2, 350)


def _staged_ids(dsn: str, run_key: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return store.staged_vector_ids(conn, run_key)


def _merge_waiting_on_lock(conn: psycopg.Connection, table: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
        (f"INSERT INTO %{table}%",),
    ).fetchone()
    return bool(row and row[0])


def _interrupt_a_merge(
    server: EmbeddedPostgres, locked_id: str, upsert: Callable[[], Any], stop: Callable[[], None]
) -> BaseException | None:
    """Run ``upsert`` in a thread, park one merge on a row lock, ``stop`` the server; the upsert's error."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            upsert()
        except BaseException as exc:
            errors.append(exc)

    blocker = psycopg.connect(server.uri())  # closed, never committed: the stop kills it
    try:
        # The collection's first version's table (its name, db_fault.chunks, is a view over it).
        blocker.execute("SELECT 1 FROM db_fault.chunks__v1 WHERE id = %s FOR UPDATE", (locked_id,))
        worker = threading.Thread(target=target, name="upsert")
        worker.start()
        with psycopg.connect(server.uri(), autocommit=True) as watcher:
            deadline = time.monotonic() + 60
            while not _merge_waiting_on_lock(watcher, '"db_fault"."chunks__v1"'):
                assert worker.is_alive() and time.monotonic() < deadline, "the merge never reached the lock"
                time.sleep(0.02)
        stop()
        worker.join(timeout=60)
    finally:
        blocker.close()
    return errors[0] if errors else None


def _whole_spans_only(dsn: str, spans: list[list[str]]) -> set[str]:
    """Only whole spans are in, and not the interrupted one; returns the ids of the finished spans.

    A finished span's rows are all version 2; every other row is version 1, and nothing was deleted.
    """
    chunks, _ = stored_chunks(dsn, "db_fault", "chunks")
    done: set[str] = set()
    for number, span in enumerate(spans):
        versions = {chunks[chunk].metadata["version"] if chunk in chunks else None for chunk in span}
        assert versions == {2} or 2 not in versions, f"span {number} is partly merged: {versions}"
        if versions == {2}:
            done |= set(span)
    assert not done & set(spans[LOCKED_SPAN]), "the interrupted span was committed"
    v1_ids = {f"{d['id']}_chunk_{j}" for d in V1 for j in range(len(d["chunks"]))}
    assert set(chunks) == v1_ids | done, "rows deleted before every batch was in"
    for chunk_id, chunk in chunks.items():
        assert chunk.metadata == {"version": 2 if chunk_id in done else 1}, chunk_id
    return done


@pytest.fixture
def collection(running_private_pg: EmbeddedPostgres, tmp_path: Path) -> dict[str, Any]:
    """The private server holds version 1; version 2 is embedded and staged, ready to upsert."""
    dsn = running_private_pg.uri()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS db_fault CASCADE")
    settings = _settings("db_fault")
    run_pipeline(settings, run_key_for("db_fault", "v1"), [jsonl_batch(tmp_path / "v1.jsonl", V1)])
    assert_table_holds_exactly(dsn, "db_fault", "chunks", V1, model="hash-v1", dimension=DIMENSION)
    batch = jsonl_batch(tmp_path / "v2.jsonl", V2)
    run_key = run_key_for("db_fault", "v2")
    aggregate = run_until_upsert(settings, run_key, [batch])
    assert aggregate is not None and aggregate["to_delete"] == 60 * 2
    staged = _staged_ids(dsn, run_key)
    spans = [staged[i : i + UPSERT_BATCH] for i in range(0, len(staged), UPSERT_BATCH)]
    # Lock a row version 1 already has, past the start of its span: the merge writes some rows of
    # the span, then waits.
    locked = next(chunk for chunk in spans[LOCKED_SPAN][UPSERT_BATCH // 2 :] if chunk.endswith("_chunk_1"))
    return {"settings": settings, "aggregate": aggregate, "locked": locked, "spans": spans, "batch": batch}


def test_fast_stop_mid_merge_then_the_retry_finishes_exactly(
    running_private_pg: EmbeddedPostgres, collection: dict[str, Any]
) -> None:
    server, settings, aggregate = running_private_pg, collection["settings"], collection["aggregate"]

    error = _interrupt_a_merge(
        server, collection["locked"], lambda: upsert_vectors(settings, aggregate), server.stop
    )

    assert isinstance(error, psycopg.OperationalError), repr(error)
    server.start()
    _whole_spans_only(server.uri(), collection["spans"])  # the interrupted span rolled back whole

    result = upsert_vectors(settings, aggregate)  # the task's retry

    assert result["deleted"] == 120 and result["expected_count"] == sum(len(d["chunks"]) for d in V2)
    assert_table_holds_exactly(server.uri(), "db_fault", "chunks", V2, model="hash-v1", dimension=DIMENSION)
    assert _staged_ids(server.uri(), aggregate["run_key"]) == []


def test_crash_mid_merge_then_a_rerun_finishes_exactly(
    running_private_pg: EmbeddedPostgres, collection: dict[str, Any]
) -> None:
    server, settings, aggregate = running_private_pg, collection["settings"], collection["aggregate"]

    def crash() -> None:  # what a power cut or an OOM kill does: no shutdown, recovery on start
        server._run(["pg_ctl", "-D", str(server.pgdata), "-m", "immediate", "-w", "stop"])

    error = _interrupt_a_merge(
        server, collection["locked"], lambda: upsert_vectors(settings, aggregate), crash
    )

    assert isinstance(error, psycopg.OperationalError), repr(error)
    server.start()
    done = _whole_spans_only(server.uri(), collection["spans"])
    if _staging_is_unlogged(server.uri(), aggregate["run_key"]):
        # Crash recovery empties unlogged staging: the retry must say so and leave the table alone,
        with pytest.raises(Exception, match="re-run the DAG"):
            upsert_vectors(settings, aggregate)
        assert _whole_spans_only(server.uri(), collection["spans"]) == done
        # and a new run of the same batch embeds what is missing and finishes the job.
        result = run_pipeline(settings, run_key_for("db_fault", "v2 again"), [collection["batch"]])
        assert result["upserted"] == sum(len(d["chunks"]) for d in V2) - len(done)
    else:
        upsert_vectors(settings, aggregate)  # logged staging survives: the retry finishes
    assert_table_holds_exactly(server.uri(), "db_fault", "chunks", V2, model="hash-v1", dimension=DIMENSION)


def _staging_is_unlogged(dsn: str, run_key: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT relpersistence FROM pg_class WHERE oid = %s::regclass",
            (store.run_table(run_key, "vectors").as_string(conn),),
        )
        return row.fetchone() == ("u",)

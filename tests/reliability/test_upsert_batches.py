"""``batch_upsert_vectors`` merges its batches on ``upsert_parallelism`` connections at once.

Whatever the parallelism, a batch that Postgres refuses rolls back alone: the other batches are
in, whole, nothing is deleted, staging is kept, and the retry (once the cause is gone) ends with
exactly the new version of every document.
"""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from capstone import pipeline, store
from capstone.contracts import EmbeddingTotals
from capstone.pipeline import run_key_for, upsert_vectors
from capstone.settings import CollectionSettings
from tests.support.pipeline import run_pipeline, run_until_upsert
from tests.support.settings import collection_settings
from tests.support.tables import assert_table_holds_exactly, jsonl_batch, stored_chunks
from tests.support.versions import live_table

DIMENSION = 32
UPSERT_BATCH = 50


def _version(number: int, documents: int) -> list[dict[str, Any]]:
    """Version 2 changes every chunk, drops two chunks of every fifth document and adds documents."""
    return [
        {
            "id": f"doc-{i:04d}",
            "content": f"document {i} v{number}",
            "chunks": [
                f"document {i} chunk {j} version {number}" for j in range(4 if number == 1 or i % 5 else 2)
            ],
            "metadata": {"version": number},
        }
        for i in range(documents)
    ]


V1, V2 = _version(1, 150), _version(2, 175)
LOST = 2 * len(range(0, 150, 5))  # version-1 chunks version 2 no longer has


def _staged_at_version_1(
    tmp_path: Path, schema: str, parallelism: int
) -> tuple[CollectionSettings, EmbeddingTotals]:
    """Version 1 stored, version 2 embedded and staged: the aggregate to upsert."""
    settings = collection_settings(
        "merges",
        schema,
        "chunks",
        embedding={"dimension": DIMENSION, "batch_size": 5000},
        upsert_batch_size=UPSERT_BATCH,
        upsert_parallelism=parallelism,
    )
    run_pipeline(settings, run_key_for("merges", "v1"), [jsonl_batch(tmp_path / "v1.jsonl", V1)])
    aggregate = run_until_upsert(
        settings, run_key_for("merges", "v2"), [jsonl_batch(tmp_path / "v2.jsonl", V2)]
    )
    assert aggregate is not None and aggregate["to_delete"] == LOST
    return settings, aggregate


def _ids_between(conn: psycopg.Connection, run_key: str, first: str, last: str) -> list[str]:
    query = sql.SQL("SELECT id FROM {} WHERE id BETWEEN %s AND %s ORDER BY id")
    return [row[0] for row in conn.execute(query.format(store.run_table(run_key, "vectors")), (first, last))]


@pytest.mark.parametrize("parallelism", [1, 3])
def test_a_refused_batch_rolls_back_alone_and_the_retry_finishes_exactly(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str, parallelism: int
) -> None:
    settings, aggregate = _staged_at_version_1(tmp_path, pg_schema, parallelism)
    run_key = aggregate["run_key"]
    spans = store.merge_spans(pg_conn, run_key, UPSERT_BATCH)
    staged = store.staged_vector_ids(pg_conn, run_key)
    span_ids = [_ids_between(pg_conn, run_key, first, last) for first, last, _count in spans]
    assert sorted(i for ids in span_ids for i in ids) == sorted(staged)
    refused = span_ids[3][len(span_ids[3]) // 2]  # Postgres refuses one row in the middle of span 4
    table = sql.Identifier(pg_schema, live_table(pg_dsn, pg_schema, "chunks"))  # behind the view "chunks"
    pg_conn.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT refuse_one CHECK (id <> {}) NOT VALID").format(
            table, sql.Literal(refused)
        )
    )

    with pytest.raises(RuntimeError, match=rf"^1 of {len(spans)} upsert batches failed .*batch 4: "):
        upsert_vectors(settings, aggregate)

    chunks, _ = stored_chunks(pg_dsn, pg_schema, "chunks")
    for number, ids in enumerate(span_ids, start=1):
        versions = {chunks[i].metadata["version"] for i in ids if i in chunks}
        assert versions == ({1} if number == 4 else {2}), f"span {number}: versions {versions}"
    v1_ids = {f"{d['id']}_chunk_{j}" for d in V1 for j in range(len(d["chunks"]))}
    assert v1_ids <= set(chunks), "chunks deleted before every batch was in"
    assert store.staged_vector_ids(pg_conn, run_key) == staged, "staging dropped before every batch was in"

    pg_conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT refuse_one").format(table))
    result = upsert_vectors(settings, aggregate)  # the task's retry

    assert result["deleted"] == LOST and result["failed"] == 0
    assert result["expected_count"] == sum(len(d["chunks"]) for d in V2)
    assert_table_holds_exactly(pg_dsn, pg_schema, "chunks", V2, model="hash-v1", dimension=DIMENSION)
    assert not store.run_staging_exists(pg_conn, run_key)


def test_batches_are_merged_on_upsert_parallelism_connections_at_once(
    tmp_path: Path, pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, aggregate = _staged_at_version_1(tmp_path, pg_schema, parallelism=3)
    # The first three merges wait for each other: they pass only if three run at the same time.
    together = threading.Barrier(3, timeout=30)
    calls = itertools.count()
    backends: set[int] = set()
    merge_batch = store.merge_batch

    def merge_when_three_are_merging(conn: psycopg.Connection, *args: Any, **kwargs: Any) -> int:
        backends.add(conn.info.backend_pid)
        if next(calls) < 3:
            together.wait()  # BrokenBarrierError after 30 s unless three connections merge at once
        return merge_batch(conn, *args, **kwargs)

    monkeypatch.setattr(store, "merge_batch", merge_when_three_are_merging)
    result = upsert_vectors(settings, aggregate)

    assert len(backends) == 3 and not together.broken
    assert result["upserted"] == aggregate["embedded"] and result["deleted"] == LOST
    assert_table_holds_exactly(pg_dsn, pg_schema, "chunks", V2, model="hash-v1", dimension=DIMENSION)


def test_extra_connections_refused_by_the_server_leave_the_merge_to_the_others(
    tmp_path: Path,
    pg_dsn: str,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings, aggregate = _staged_at_version_1(tmp_path, pg_schema, parallelism=4)
    connect = pipeline._connect
    opened = itertools.count()

    def max_connections_reached_after_one(settings: CollectionSettings) -> psycopg.Connection:
        if next(opened) > 0:
            raise psycopg.OperationalError("FATAL: sorry, too many clients already")
        return connect(settings)

    monkeypatch.setattr(pipeline, "_connect", max_connections_reached_after_one)
    with caplog.at_level(logging.WARNING, logger="capstone.pipeline"):
        result = upsert_vectors(settings, aggregate)

    assert result["upserted"] == aggregate["embedded"] and result["deleted"] == LOST
    assert_table_holds_exactly(pg_dsn, pg_schema, "chunks", V2, model="hash-v1", dimension=DIMENSION)
    refused = [r for r in caplog.records if "could not open an extra upsert connection" in r.getMessage()]
    assert len(refused) == 3 and "too many clients" in refused[0].getMessage()

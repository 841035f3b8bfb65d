"""Two runs of one collection at once (e.g. a manual run while an asset run is active).

The generated DAG allows one active run by default, so Airflow queues the second; these tests
show that even two runs that do overlap (another DAG id on the same table, a raised
``max_active_runs``) end consistent: exact rows, one valid index, built once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from capstone.documents import BatchLocation
from capstone.index_build import IndexParams, build_index
from capstone.pipeline import (
    aggregate_manifests,
    embed_batch,
    load_documents,
    prepare_chunks,
    run_key_for,
    upsert_vectors,
)
from capstone.versions import version_table_name
from dag_factory.builder import build_collection_dag
from dag_factory.loader import load_collection
from tests.support.index_build import IndexRow, indexes_on
from tests.support.settings import collection_settings
from tests.support.tables import assert_table_holds_exactly, jsonl_batch

log = logging.getLogger("test_concurrency")


def test_generated_dag_allows_one_active_run_by_default(tmp_path: Path) -> None:
    path = tmp_path / "faq.yaml"
    path.write_text("collection: faq\nembedding:\n  provider: hash\n")

    dag = build_collection_dag(load_collection(path), path)

    assert dag.max_active_runs == 1


def _documents(first: int, last: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"doc-{i:04d}",
            "content": f"document {i}",
            "chunks": [f"document {i} chunk {j} about concurrent runs" for j in range(4)],
            "metadata": {"n": i},
        }
        for i in range(first, last)
    ]


@pytest.mark.slow
def test_two_overlapping_runs_end_with_exact_rows_and_one_index(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    settings = collection_settings(
        "twice", pg_schema, embedding={"dimension": 64, "batch_size": 100}, upsert_batch_size=40
    )
    first, second = _documents(0, 400), _documents(200, 600)  # 200 documents in both runs
    batches = {
        "run-a": jsonl_batch(tmp_path / "a.jsonl", first),
        "run-b": jsonl_batch(tmp_path / "b.jsonl", second),
    }
    # The collection's first version, which both runs write to (behind the view at "twice").
    params = IndexParams.of(
        replace(settings, store=replace(settings.store, table=version_table_name("twice", 1)))
    )
    at_merge, at_build = threading.Barrier(2, timeout=60), threading.Barrier(2, timeout=60)
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            run_key = run_key_for("twice", name)
            load_documents(settings, run_key, [BatchLocation.from_extra(batches[name])])
            prepared = prepare_chunks(settings, run_key, max_batches=1024)
            manifests = [embed_batch(settings, run_key, batch) for batch in prepared["batches"]]
            aggregate = aggregate_manifests(prepared["summary"], manifests)
            at_merge.wait()  # both merge at the same moment, into overlapping ids
            upserted = upsert_vectors(settings, aggregate)
            at_build.wait()  # both ask for the index at the same moment
            event = asyncio.run(build_index(pg_dsn, params, upserted["expected_count"], 0.05, 120, log))
            results[name] = {"upserted": upserted, "event": event}
        except BaseException as exc:
            errors.append(exc)
            at_merge.abort()
            at_build.abort()

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)

    assert not errors, errors
    union = _documents(0, 600)
    assert_table_holds_exactly(pg_dsn, pg_schema, "twice", union, model="hash-v1", dimension=64)
    events = [result["event"] for result in results.values()]
    assert [event["status"] for event in events] == ["success", "success"], events
    assert sum(event["builds_started"] for event in events) == 1  # one writer built it, the other waited
    assert {event["index_name"] for event in events} == {params.index_name}
    assert indexes_on(pg_conn, pg_schema, params.table) == [IndexRow(params.index_name, "hnsw", True)]

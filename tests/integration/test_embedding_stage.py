"""How a run's chunks are shared among mapped embedding tasks, and how a retried task resumes."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from capstone import store
from capstone.documents import BatchLocation
from capstone.embeddings.hashing import HashEmbedder
from capstone.errors import is_terminal
from capstone.local.corpus import reference_documents, write_jsonl_batch
from capstone.pipeline import aggregate_manifests, embed_batch, load_documents, prepare_chunks, run_key_for
from tests.support.airflow import run_collection, task_states, write_collection, xcoms
from tests.support.settings import collection_settings

DIMENSION = 64


def _documents(count: int, chunks_each: int = 5) -> list[dict[str, Any]]:
    return [
        {
            "id": f"doc{i:03d}",
            "content": f"document {i}",
            "chunks": [f"document {i} part {j} about subject {i % 11}" for j in range(chunks_each)],
        }
        for i in range(count)
    ]


def _staged_vectors(dsn: str, run_key: str) -> dict[str, np.ndarray]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id, embedding::text FROM {}").format(store.run_table(run_key, "vectors"))
        ).fetchall()
    return {chunk: np.array(text.strip("[]").split(","), dtype=np.float32) for chunk, text in rows}


@pytest.mark.parametrize(
    ("chunks", "batch_size", "parallel_tasks", "shares"),
    [
        (733, 64, 2, [367, 366]),  # many batches, two slots: two tasks of equal size
        (733, 512, 2, [367, 366]),  # not 512 + 221: the tasks finish together
        (100, 512, 2, [100]),  # never more tasks than batches
        (1000, 100, 64, [100] * 10),  # one task per batch when parallel_tasks allows
        (10, 1, 3, [4, 3, 3]),
    ],
)
def test_chunks_are_shared_evenly_among_at_most_parallel_tasks(
    tmp_path: Path, pg_schema: str, chunks: int, batch_size: int, parallel_tasks: int, shares: list[int]
) -> None:
    settings = collection_settings(
        "shares",
        pg_schema,
        embedding={"dimension": DIMENSION, "batch_size": batch_size, "parallel_tasks": parallel_tasks},
    )
    documents = [{"id": f"d{i:04d}", "content": "x", "chunks": [f"chunk {i}"]} for i in range(chunks)]
    run_key = run_key_for("shares", str(chunks))
    batch = write_jsonl_batch(documents, tmp_path / "batch.jsonl")
    load_documents(settings, run_key, [BatchLocation.from_extra({"format": "jsonl", "path": str(batch)})])

    prepared = prepare_chunks(settings, run_key, max_batches=1024)

    assert [descriptor["chunks"] for descriptor in prepared["batches"]] == shares


def test_a_retried_task_embeds_only_what_its_earlier_try_did_not_stage(
    tmp_path: Path, pg_dsn: str, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = collection_settings(
        "resume", pg_schema, embedding={"dimension": DIMENSION, "batch_size": 20, "parallel_tasks": 1}
    )
    run_key = run_key_for("resume", "r1")
    batch = write_jsonl_batch(_documents(20), tmp_path / "batch.jsonl")  # 100 chunks, one task
    load_documents(settings, run_key, [BatchLocation.from_extra({"format": "jsonl", "path": str(batch)})])
    (descriptor,) = prepare_chunks(settings, run_key, max_batches=1024)["batches"]
    # An earlier try staged its first 40 chunks (marked vectors), then its worker died.
    with psycopg.connect(pg_dsn) as conn:
        (earlier, _texts), *_ = store.pending_batch_texts(conn, run_key, settings.store_table, 0, 40)
    marker = np.full((40, DIMENSION), 1 / math.sqrt(DIMENSION), dtype=np.float32)
    with psycopg.connect(pg_dsn) as conn:
        store.write_batch_vectors(conn, run_key, earlier, marker)

    with caplog.at_level(logging.INFO, logger="capstone.pipeline"):
        manifest = embed_batch(settings, run_key, descriptor)

    assert (manifest["embedded"], manifest["failed"]) == (100, 0)
    staged = _staged_vectors(pg_dsn, run_key)
    assert len(staged) == 100
    kept = [chunk for chunk in earlier if np.allclose(staged[chunk], marker[0], atol=1e-6)]
    assert kept == earlier  # not embedded again
    rest = sorted(set(staged) - set(earlier))
    texts = {
        f"doc{i:03d}_chunk_{j}": doc
        for i, d in enumerate(_documents(20))
        for j, doc in enumerate(d["chunks"])
    }
    expected = HashEmbedder(dimension=DIMENSION).embed([texts[chunk] for chunk in rest])
    np.testing.assert_allclose(np.stack([staged[chunk] for chunk in rest]), expected, atol=1e-6)
    # progress in steps of batch_size, counted from where the earlier try stopped
    progress = [r.getMessage() for r in caplog.records if "chunks embedded (" in r.getMessage()]
    assert [line.split(":")[1].split()[0] for line in progress] == ["60/100", "80/100", "100/100"]
    assert any("40 of 100 chunks were staged by an earlier try" in r.getMessage() for r in caplog.records)


def test_staging_emptied_by_a_crash_fails_the_task_at_once_and_the_aggregate_too(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    settings = collection_settings(
        "crashed", pg_schema, embedding={"dimension": DIMENSION, "batch_size": 20, "parallel_tasks": 2}
    )
    run_key = run_key_for("crashed", "r1")
    batch = write_jsonl_batch(_documents(20), tmp_path / "batch.jsonl")
    load_documents(settings, run_key, [BatchLocation.from_extra({"format": "jsonl", "path": str(batch)})])
    prepared = prepare_chunks(settings, run_key, max_batches=1024)
    first, second = prepared["batches"]
    manifest = embed_batch(settings, run_key, first)
    # What a crash does to unlogged tables: they stay, empty.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for kind in store.STAGING_KINDS:
            conn.execute(sql.SQL("TRUNCATE {}").format(store.run_table(run_key, kind)))

    with pytest.raises(store.StagingIncomplete, match=r"batch 1 .* not in staging.*re-run the DAG") as raised:
        embed_batch(settings, run_key, second)
    assert is_terminal(raised.value)
    # Had the lost task reported nothing, the totals would not add up: the aggregate says so.
    with pytest.raises(store.StagingIncomplete, match=r"100 chunks were to be embedded.*staged 50"):
        aggregate_manifests(prepared["summary"], [manifest, None])


@pytest.mark.usefixtures("airflow_db")
def test_by_default_a_run_maps_one_task_per_pool_slot(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    spec = write_collection(
        tmp_path / "configs",
        "per_slot",
        pg_schema,
        embedding={"batch_size": 64, "parallel_tasks": None, "pool_slots": 2},
    )
    documents = reference_documents()
    batch = write_jsonl_batch(documents, tmp_path / "batch.jsonl")

    run = run_collection(spec, [{"format": "jsonl", "path": str(batch)}])

    states = task_states("per_slot", run.run_id)
    assert str(run.state) == "success", states
    assert states["generate_embedding"] == ["success", "success"]
    embedded = [
        value
        for task_id, _index, key, value in xcoms("per_slot", run.run_id)
        if task_id == "generate_embedding" and key == "embedded"
    ]
    chunks = sum(len(doc["chunks"]) for doc in documents)
    assert sorted(embedded) == [chunks // 2, chunks - chunks // 2]
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*), count(DISTINCT id) FROM {}").format(
                sql.Identifier(pg_schema, "per_slot")
            )
        ).fetchone()
    assert row == (chunks, chunks)

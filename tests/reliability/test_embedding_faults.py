"""Embedding faults through ``dag.test()``: the real ``openai`` client against a fake that fails.

Random 429s (with Retry-After), 500s and hangs past the client's timeout are absorbed by the
client's retries and Airflow's task retries; a batch that fails every retry fails the run without
touching the table, and the next run indexes its chunks once the fault is gone. Chunks the API
refuses for what they are (over the model's token limit) are found, left out and published as
failed, while the rest of their batch is indexed; the next run tries only them again.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from capstone import store
from capstone.documents import BatchLocation
from capstone.embeddings import EmbeddingInputRejected
from capstone.pipeline import embed_batch, load_documents, prepare_chunks, run_key_for
from tests.support.airflow import (
    asset_events,
    run_collection,
    task_states,
    try_numbers,
    write_collection,
    xcom_value,
    xcoms,
)
from tests.support.fake_openai import FaultPlanServer
from tests.support.settings import collection_settings
from tests.support.tables import assert_table_holds_exactly, jsonl_batch, stored_chunks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]

MODEL = "text-embedding-3-small"
DIMENSION = 64
CLIENT_ATTEMPTS = 6  # the openai client's first try plus its 5 retries (create_embedder's default)


def _documents(count: int, chunks: int = 4, marker: str = "") -> list[dict[str, Any]]:
    return [
        {
            "id": f"doc-{i:03d}",
            "content": f"document {i}",
            "chunks": [
                f"document {i} section {j} on retries and faults {marker if i == 7 else ''}"
                for j in range(chunks)
            ],
            "metadata": {"n": i},
        }
        for i in range(count)
    ]


def _openai_collection(
    configs: Path, name: str, schema: str, server: FaultPlanServer, retries: int, concurrent_requests: int = 4
) -> Path:
    return write_collection(
        configs,
        name,
        schema,
        embedding={
            "provider": "openai",
            "model": MODEL,
            "dimension": DIMENSION,
            "base_url": server.base_url,
            "batch_size": 40,
            "request_batch_size": 10,
            "retries": retries,
            "retry_delay_seconds": 0,
            "max_retry_delay_seconds": 1,
            "request_timeout_seconds": 0.5,
            "max_concurrent_requests": concurrent_requests,
        },
    )


def test_random_429_500_and_timeouts_are_retried_to_an_exact_table(
    tmp_path: Path,
    pg_dsn: str,
    pg_schema: str,
    faulty_openai: FaultPlanServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", faulty_openai.api_key)
    documents = _documents(50)
    # One request at a time, so that the planned burst below hits one request, not four.
    spec = _openai_collection(
        tmp_path / "configs", "flaky_api", pg_schema, faulty_openai, retries=3, concurrent_requests=1
    )
    # The first request fails more often than the client retries: its task fails once and
    # Airflow's retry finishes it. Then one fault of each kind, then 30% of calls fail at random.
    faulty_openai.fail_next(CLIENT_ATTEMPTS, "500", retry_after=0.05)
    faulty_openai.fail_next(1, "429", retry_after=0.05)
    faulty_openai.fail_next(1, "hang")
    faulty_openai.fail_next(1, "500", retry_after=0.05)
    faulty_openai.mixed_failure_rate = 0.3

    run = run_collection(spec, [jsonl_batch(tmp_path / "batch.jsonl", documents)])

    states = task_states("flaky_api", run.run_id)
    assert str(run.state) == "success", states
    assert_table_holds_exactly(pg_dsn, pg_schema, "flaky_api", documents, model=MODEL, dimension=DIMENSION)
    # Failures are visible: in the server's record (by kind) and in Airflow's try numbers.
    failures = Counter(request.status for request in faulty_openai.failed_requests())
    planned = CLIENT_ATTEMPTS + 3
    assert failures[500] >= CLIENT_ATTEMPTS + 1 and failures[429] >= 1 and failures[0] >= 1, failures
    assert sum(failures.values()) > planned, f"no random failure at a 30% rate: {failures}"
    assert any((request.retry_count or 0) > 0 for request in faulty_openai.embedding_requests())
    tries = try_numbers("flaky_api", run.run_id, "generate_embedding")
    # The planned burst fails one task's first try for sure; random faults rarely fail another.
    assert len(tries) == 5 and max(tries) >= 2 and tries.count(1) >= 3, tries
    # Every chunk was answered at least once, and stored once.
    texts = {text for doc in documents for text in doc["chunks"]}
    assert texts <= set(faulty_openai.answered_texts())
    upserted = xcom_value("flaky_api", run.run_id, "batch_upsert_vectors")
    assert upserted["expected_count"] == len(texts) == 200


def test_a_batch_failing_every_retry_leaves_its_chunks_for_the_next_run(
    tmp_path: Path,
    pg_dsn: str,
    pg_schema: str,
    faulty_openai: FaultPlanServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", faulty_openai.api_key)
    marker = "POISON-PILL"
    documents = _documents(30, marker=marker)
    spec = _openai_collection(tmp_path / "configs", "poisoned", pg_schema, faulty_openai, retries=1)
    batch = jsonl_batch(tmp_path / "batch.jsonl", documents)
    faulty_openai.poison_marker = marker

    failed = run_collection(spec, [batch])

    states = task_states("poisoned", failed.run_id)
    assert str(failed.state) == "failed", states
    assert sorted(states["generate_embedding"]) == ["failed", "success", "success"]
    assert states["batch_upsert_vectors"] == ["upstream_failed"]
    assert states["publish_indexed_asset"] == ["upstream_failed"]
    poisoned = [r for r in faulty_openai.embedding_requests() if any(marker in text for text in r.inputs)]
    # Two Airflow tries, each retried by the client: more calls than one try makes, and at most
    # what two tries of up to 4 concurrent requests (max_concurrent_requests) make. (Not exact:
    # a fresh clone's CI-like run once recorded 11 of 12; the exact count of client attempts is
    # not ours, and the first failure of a try cancels its other requests wherever they are.)
    assert CLIENT_ATTEMPTS < len(poisoned) <= 2 * 4 * CLIENT_ATTEMPTS
    assert {r.status for r in poisoned} == {500}
    assert max(try_numbers("poisoned", failed.run_id, "generate_embedding")) == 2
    # Nothing half-written: the good batches were embedded but nothing reached the table.
    assert stored_chunks(pg_dsn, pg_schema, "poisoned") == ({}, {})

    faulty_openai.poison_marker = None
    run = run_collection(spec, [batch])

    assert str(run.state) == "success", task_states("poisoned", run.run_id)
    prepared = [value for task, _, key, value in xcoms("poisoned", run.run_id) if key == "summary"]
    assert prepared[0]["to_embed"] == 120  # every chunk: the failed run stored none of them
    assert_table_holds_exactly(pg_dsn, pg_schema, "poisoned", documents, model=MODEL, dimension=DIMENSION)


def _with_long_chunks(documents: list[dict[str, Any]], where: dict[str, int], text: str) -> list[str]:
    """Replace the chunk ``where[doc_id]`` of each named document by ``text``; their chunk ids."""
    for doc in documents:
        if doc["id"] in where:
            doc["chunks"][where[doc["id"]]] = text
    return sorted(f"{doc_id}_chunk_{index}" for doc_id, index in where.items())


def test_chunks_the_api_refuses_are_left_out_and_the_rest_is_published(
    tmp_path: Path,
    pg_dsn: str,
    pg_schema: str,
    faulty_openai: FaultPlanServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", faulty_openai.api_key)
    documents = _documents(30)
    long_text = " ".join(f"word{n}" for n in range(80))
    refused = _with_long_chunks(documents, {"doc-007": 1, "doc-021": 3}, long_text)
    spec = _openai_collection(tmp_path / "configs", "too_long", pg_schema, faulty_openai, retries=1)
    batch = jsonl_batch(tmp_path / "batch.jsonl", documents)
    faulty_openai.max_input_tokens = 50  # the chunks are within the character limit, not the token one

    run = run_collection(spec, [batch])

    states = task_states("too_long", run.run_id)
    assert str(run.state) == "success", states
    assert max(try_numbers("too_long", run.run_id, "generate_embedding")) == 1  # not retried: no use
    aggregated = xcom_value("too_long", run.run_id, "aggregate_embeddings")
    assert (aggregated["failed_count"], sorted(aggregated["failed_ids"])) == (2, refused)
    assert_table_holds_exactly(
        pg_dsn, pg_schema, "too_long", documents, model=MODEL, dimension=DIMENSION, missing=refused
    )
    (event,) = [e for e in asset_events("too_long.indexed") if e["run_id"] == run.run_id]
    assert event["chunks_failed"] == 2 and sorted(event["failed_chunk_ids"]) == refused
    assert event["chunks_embedded"] == 118
    # Each refused chunk was sent alone at the end of its search, and nothing else was refused alone.
    alone = [r.inputs for r in faulty_openai.embedding_requests() if len(r.inputs) == 1 and r.status == 400]
    assert alone == [[long_text], [long_text]]

    faulty_openai.max_input_tokens = None  # the model with the longer context, or the chunks split
    again = run_collection(spec, [batch])

    assert str(again.state) == "success", task_states("too_long", again.run_id)
    prepared = [value for _task, _, key, value in xcoms("too_long", again.run_id) if key == "summary"]
    assert prepared[0]["to_embed"] == 2  # only the chunks refused last time
    assert_table_holds_exactly(pg_dsn, pg_schema, "too_long", documents, model=MODEL, dimension=DIMENSION)


def test_a_request_refused_whatever_it_holds_fails_the_batch(
    tmp_path: Path,
    pg_dsn: str,
    pg_schema: str,
    faulty_openai: FaultPlanServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", faulty_openai.api_key)
    settings = collection_settings(
        "refused",
        pg_schema,
        embedding={
            "provider": "openai",
            "model": MODEL,
            "dimension": DIMENSION,
            "base_url": faulty_openai.base_url,
            "batch_size": 40,
            "request_batch_size": 10,
        },
    )
    run_key = run_key_for("refused", "r1")
    batch = jsonl_batch(tmp_path / "batch.jsonl", _documents(5))
    load_documents(settings, run_key, [BatchLocation.from_extra(batch)])
    (descriptor,) = prepare_chunks(settings, run_key, max_batches=1024)["batches"]
    faulty_openai.max_input_tokens = 0  # every input is refused, even the one-word probe

    with pytest.raises(EmbeddingInputRejected, match=r"rejected a request of 10 inputs.*maximum context"):
        embed_batch(settings, run_key, descriptor)

    with psycopg.connect(pg_dsn) as conn:
        assert store.count_staged_vectors(conn, run_key) == 0
    # The batch's requests (two of 10, sent at once; the first refusal cancels the other if it is
    # not out yet), then the one-word probe: no bisection down to single inputs.
    sizes = [len(r.inputs) for r in faulty_openai.embedding_requests()]
    assert sizes[0] == 10 and sizes.count(1) == 1 and set(sizes) == {1, 10} and len(sizes) <= 3, sizes

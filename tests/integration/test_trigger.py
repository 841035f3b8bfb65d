"""``VectorStoreIndexingTrigger``: serialisation, concurrent triggers for one index, and a
triggerer killed in the middle of a build."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from airflow.sdk.module_loading import import_string

from capstone.index_build import KeywordIndexParams
from capstone.triggers import VectorStoreIndexingTrigger
from tests.support.index_build import (
    BUILDERS_SQL,
    IndexRow,
    create_collection,
    indexes_on,
    params_of,
    run_trigger,
    trigger_kwargs,
    wait_for_build,
    wait_until_gone,
)
from tests.support.settings import index_params

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_serialize_round_trips_through_the_class_path() -> None:
    trigger = VectorStoreIndexingTrigger(
        collection_name="docs",
        expected_count=42,
        index=index_params(
            "public", "docs", type="ivfflat", metric="l2", lists=10, maintenance_work_mem="256MB"
        ),
        connection_id="my_pg",
        poll_interval=5,
        timeout=60,
    )
    classpath, kwargs = trigger.serialize()

    assert classpath == "capstone.triggers.VectorStoreIndexingTrigger"
    rebuilt = import_string(classpath)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert rebuilt.params == trigger.params
    assert kwargs["expected_count"] == 42 and kwargs["timeout"] == 60.0 and kwargs["index"]["lists"] == 10
    assert json.loads(json.dumps(kwargs)) == kwargs  # Airflow stores the kwargs as JSON
    assert kwargs["keyword_index"] is None and rebuilt.keyword is None
    assert "vector_type" not in kwargs["index"]  # what releases before halfvec serialized and read
    assert "quantization" not in kwargs["index"] and "dimension" not in kwargs["index"]


def test_a_halfvec_index_serializes_its_type() -> None:
    params = replace(index_params("public", "docs"), vector_type="halfvec")
    trigger = VectorStoreIndexingTrigger(
        collection_name="docs", expected_count=1, index=params, connection_id="c", poll_interval=1, timeout=9
    )
    _, kwargs = trigger.serialize()

    assert kwargs["index"]["vector_type"] == "halfvec"
    assert VectorStoreIndexingTrigger(**kwargs).params == params
    assert (
        params.opclass == "halfvec_cosine_ops"
        and params.index_name != index_params("public", "docs").index_name
    )


def test_a_binary_quantized_index_serializes_its_quantization_and_indexes_the_bits() -> None:
    params = replace(index_params("public", "docs"), quantization="binary", dimension=256)
    trigger = VectorStoreIndexingTrigger(
        collection_name="docs", expected_count=1, index=params, connection_id="c", poll_interval=1, timeout=9
    )
    _, kwargs = trigger.serialize()

    assert (kwargs["index"]["quantization"], kwargs["index"]["dimension"]) == ("binary", 256)
    assert VectorStoreIndexingTrigger(**kwargs).params == params
    assert '((binary_quantize("embedding")::bit(256)) bit_hamming_ops)' in params.create_sql()
    assert params.index_name != index_params("public", "docs").index_name


def test_serialize_round_trips_the_keyword_index() -> None:
    keyword = KeywordIndexParams("public", "docs", "256MB")
    trigger = VectorStoreIndexingTrigger(
        collection_name="docs",
        expected_count=42,
        index=index_params("public", "docs"),
        keyword_index=keyword,
        connection_id="my_pg",
        poll_interval=5,
        timeout=60,
    )
    classpath, kwargs = trigger.serialize()

    rebuilt = import_string(classpath)(**kwargs)
    assert rebuilt.keyword == keyword and rebuilt.serialize() == (classpath, kwargs)
    assert json.loads(json.dumps(kwargs)) == kwargs


def test_a_trigger_serialized_by_an_earlier_release_builds_no_keyword_index() -> None:
    _, kwargs = VectorStoreIndexingTrigger(
        collection_name="docs",
        expected_count=1,
        index=index_params("public", "docs"),
        connection_id="my_pg",
        poll_interval=5,
        timeout=60,
    ).serialize()
    del kwargs["keyword_index"]  # what a triggerer finds in the database after an upgrade

    assert VectorStoreIndexingTrigger(**kwargs).keyword is None


async def test_success_event_carries_the_index_summary(pg_conn: psycopg.Connection, pg_schema: str) -> None:
    create_collection(pg_conn, pg_schema, "docs", 1_000)
    kwargs = trigger_kwargs(pg_schema, "docs", 1_000)

    event = await run_trigger(kwargs)

    assert event["status"] == "success" and event["collection_name"] == "docs"
    assert event["index_name"] == params_of(kwargs).index_name and event["indexed_count"] == 1_000
    assert {"index_size_bytes", "duration_s", "freshness_ms"} <= set(event)


async def test_unknown_connection_ends_in_an_error_event(pg_schema: str) -> None:
    event = await run_trigger(trigger_kwargs(pg_schema, "docs", 1, connection_id="no_such_connection"))

    assert event["status"] == "error" and event["terminal"] is True
    assert "Airflow connection 'no_such_connection' is not defined" in str(event["message"])
    assert "AIRFLOW_CONN_NO_SUCH_CONNECTION" in str(event["message"])


async def test_two_triggers_for_one_index_build_it_once(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 5_000)
    kwargs = trigger_kwargs(pg_schema, "docs", 5_000)
    name = params_of(kwargs).index_name
    stop = asyncio.Event()
    watcher = asyncio.create_task(_builder_pids(pg_dsn, pg_schema, name, stop))

    first, second = await asyncio.gather(run_trigger(kwargs), run_trigger(kwargs))
    stop.set()

    assert first["status"] == second["status"] == "success"
    assert sorted([first["builds_started"], second["builds_started"]]) == [0, 1]
    assert len(await watcher) == 1, "more than one backend built the index"
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(name, "hnsw", True)]


@pytest.mark.slow
async def test_killed_triggerer_build_is_aborted_and_a_fresh_trigger_finishes(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 20_000)
    kwargs = trigger_kwargs(pg_schema, "docs", 20_000)
    name = params_of(kwargs).index_name
    triggerer = subprocess.Popen(
        [sys.executable, "-m", "tests.support.index_build", pg_schema, "docs", "20000"],
        cwd=PROJECT_ROOT,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        orphan = await wait_for_build(pg_conn, pg_schema, name, phase="building index: loading tuples")
        triggerer.send_signal(signal.SIGKILL)
    finally:
        triggerer.kill()
        triggerer.wait()

    # The server notices the dead client (client_connection_check_interval) and aborts the build,
    # well before it could have finished: what is left is an INVALID index, not a built one.
    await wait_until_gone(pg_conn, orphan, within=5.0)
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(name, "hnsw", False)]

    event = await run_trigger(kwargs)

    assert event["status"] == "success" and event["builds_started"] == 1
    assert event["indexed_count"] == 20_000
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(name, "hnsw", True)]


async def _builder_pids(dsn: str, schema: str, name: str, stop: asyncio.Event) -> set[int]:
    """Every backend seen building index ``name`` until ``stop``."""
    pids: set[int] = set()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            rows = await (await conn.execute(BUILDERS_SQL, (schema, name))).fetchall()
            pids.update(pid for pid, _phase in rows)
            await asyncio.sleep(0.005)
    return pids

"""``VectorStoreIndexingSensor``: quick check, deferral, in-worker build, and resuming from events."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from capstone.contracts import IndexEvent
from capstone.sensors import VectorStoreIndexingSensor
from capstone.triggers import VectorStoreIndexingTrigger
from tests.support.index_build import IndexRow, create_collection, indexes_on
from tests.support.settings import index_params

if TYPE_CHECKING:
    from airflow.sdk import Context

NO_CONTEXT = cast("Context", {})


def _sensor(
    schema: str, expected_count: Any, index: dict[str, Any] | None = None, **overrides: Any
) -> VectorStoreIndexingSensor:
    kwargs: dict[str, Any] = {
        "task_id": "wait_for_indexing",
        "collection_name": "docs",
        "expected_count": expected_count,
        "index": index_params(schema, "docs", **(index or {})),
        "connection_id": "vector_store_default",
        "poll_interval": 0.05,
        "timeout": 60,
        **overrides,
    }
    return VectorStoreIndexingSensor(**kwargs)


@pytest.mark.parametrize("status", ["timeout", "error"])
def test_execute_complete_raises_on_a_failed_build(status: Literal["timeout", "error"]) -> None:
    sensor = _sensor("public", 10)
    event: IndexEvent = {"status": status, "message": "index x was not built within 5s"}

    with pytest.raises(AirflowException, match=f"collection 'docs': index build {status}: index x was not"):
        sensor.execute_complete(NO_CONTEXT, event)


def test_execute_complete_raises_without_an_event() -> None:
    with pytest.raises(AirflowException, match="ended without an event"):
        _sensor("public", 10).execute_complete(NO_CONTEXT, None)


def test_execute_complete_returns_the_success_event() -> None:
    event: IndexEvent = {"status": "success", "index_name": "docs_hnsw_0123abcd", "indexed_count": 10}

    assert _sensor("public", 10).execute_complete(NO_CONTEXT, event) == event


def test_not_deferrable_builds_in_the_worker(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 2_000)
    sensor = _sensor(pg_schema, "2000", deferrable=False)  # a rendered Jinja string

    result = sensor.execute(NO_CONTEXT)

    assert result["status"] == "success" and result["builds_started"] == 1
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(sensor.index_params.index_name, "hnsw", True)]


def test_a_small_index_is_built_in_the_worker_and_a_larger_one_deferred(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 1_500)

    with pytest.raises(TaskDeferred):
        _sensor(pg_schema, 1_500, in_worker_max_rows=1_499).execute(NO_CONTEXT)
    result = _sensor(pg_schema, 1_500, in_worker_max_rows=1_500).execute(NO_CONTEXT)

    assert result["status"] == "success" and result["builds_started"] == 1
    assert result["indexed_count"] == 1_500


def test_ready_index_returns_without_deferring(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 1_000)
    _sensor(pg_schema, 1_000, deferrable=False).execute(NO_CONTEXT)

    result = _sensor(pg_schema, 1_000).execute(NO_CONTEXT)  # deferrable, but nothing to wait for

    assert result["status"] == "success" and result["builds_started"] == 0
    assert result["indexed_count"] == 1_000


def test_missing_index_defers_to_the_trigger(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 100)
    sensor = _sensor(pg_schema, " 100 ", index={"m": 8, "ef_construction": 32}, timeout=600)

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(NO_CONTEXT)

    trigger = deferred.value.trigger
    assert isinstance(trigger, VectorStoreIndexingTrigger)
    assert trigger.expected_count == 100 and trigger.params == sensor.index_params
    assert deferred.value.method_name == "execute_complete"
    # Airflow's deferral timeout leaves the trigger time to fire its own, cleaner, timeout event.
    assert deferred.value.timeout is not None and deferred.value.timeout > timedelta(seconds=600)
    assert indexes_on(pg_conn, pg_schema, "docs") == []


def test_expected_count_that_is_not_a_number_is_refused(pg_dsn: str, pg_schema: str) -> None:
    with pytest.raises(AirflowException, match="expected_count must be a whole number"):
        _sensor(pg_schema, "{'upserted': 3}").execute(NO_CONTEXT)

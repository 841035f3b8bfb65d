"""``TableChangesTrigger`` against the real database: it fires when a followed table's capture is
missing or its queue holds changes, on its own connection (``run``) and through the shared stream
(Airflow 3.3), coalesces a burst, and fires again for changes an event did not get a run for."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from airflow.sdk.module_loading import import_string
from psycopg import sql

from capstone.pipeline import load_documents, run_key_for
from capstone.table_source import acknowledge
from capstone.table_watch import CaptureState, ChangeWatch, capture_fingerprint
from capstone.triggers import TableChangesTrigger
from tests.support.settings import collection_settings


@pytest.fixture
def followed(pg_dsn: str, pg_schema: str) -> Any:
    """A collection following ``<schema>.articles`` (two rows), its capture not installed yet."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {}.articles (id int PRIMARY KEY, body text)").format(
                sql.Identifier(pg_schema)
            )
        )
        conn.execute(
            sql.SQL("INSERT INTO {}.articles VALUES (1, 'one'), (2, 'two')").format(sql.Identifier(pg_schema))
        )
    return collection_settings(
        f"watch_{pg_schema}",
        pg_schema,
        source={"table": {"name": f"{pg_schema}.articles", "content": "body"}},
    )


def _trigger(settings: Any, **kwargs: Any) -> TableChangesTrigger:
    table = settings.source.table
    return TableChangesTrigger(
        collection=settings.collection,
        connection_id=table.connection_id,
        capture=capture_fingerprint(table),
        **{"min_interval": 0.2, "check_every": 30.0, **kwargs},
    )


class _Events:
    """The trigger's events, pumped into a queue by a task of their own (cancelling a pending
    ``anext`` would close the trigger's generator)."""

    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump(stream))

    async def _pump(self, stream: AsyncIterator[Any]) -> None:
        async for event in stream:
            self.queue.put_nowait(event.payload)

    async def next(self, timeout: float) -> dict[str, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def none_within(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self.queue.empty(), f"an event fired: {self.queue.get_nowait()}"


def _update(dsn: str, schema: str, body: str, ids: range = range(1, 2)) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in ids:
            conn.execute(
                sql.SQL("UPDATE {}.articles SET body = %s WHERE id = %s").format(sql.Identifier(schema)),
                (body, i),
            )


def test_serialize_round_trips_through_the_class_path(followed: Any) -> None:
    classpath, kwargs = _trigger(followed).serialize()
    assert classpath == "capstone.triggers.TableChangesTrigger"
    assert import_string(classpath)(**kwargs).serialize() == (classpath, kwargs)


@pytest.mark.parametrize("path", ["own connection", "shared stream"])
def test_fires_for_a_missing_capture_then_for_each_burst_of_changes(
    pg_dsn: str, pg_schema: str, followed: Any, path: str
) -> None:
    trigger = _trigger(followed)

    async def scenario() -> None:
        shared = TableChangesTrigger.open_shared_stream(trigger.serialize()[1])
        stream = trigger.run() if path == "own connection" else trigger.filter_shared_stream(shared)
        events = _Events(stream)
        try:
            assert (await events.next(timeout=20))["reason"] == "capture not installed"
            await events.none_within(1.0)  # fired once for it, not again and again

            run_key = run_key_for(followed.collection, "1")
            await asyncio.to_thread(load_documents, followed, run_key, [])  # installs, reads the table whole
            await asyncio.to_thread(acknowledge, followed.collection, followed.source.table, run_key)
            await asyncio.to_thread(_update, pg_dsn, pg_schema, "changed", range(1, 3))
            started = time.monotonic()
            second = await events.next(timeout=20)
            assert second["reason"] == "changes queued"
            assert time.monotonic() - started < 15  # woken by the NOTIFY, not by the 30 s look at the queue
            await events.none_within(1.0)  # a burst of two commits: one event

            await asyncio.to_thread(_update, pg_dsn, pg_schema, "changed again")
            third = await events.next(timeout=20)
            assert third["newest_change"] > second["newest_change"]
        finally:
            events.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events.task
            await stream.aclose()  # type: ignore[attr-defined]
            await shared.aclose()  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_fires_again_for_changes_no_run_took() -> None:
    watch = ChangeWatch("c", "capture", min_interval=0.0, refire_after=0.05)
    waiting = CaptureState("capture", "done", newest_change=7, oldest_waiting_seconds=0.0)
    assert watch.due(waiting) is not None
    assert watch.due(waiting) is None
    time.sleep(0.06)
    later = CaptureState("capture", "done", newest_change=7, oldest_waiting_seconds=0.06)
    assert watch.due(later) == {"collection": "c", "reason": "changes still queued", "newest_change": 7}
    assert watch.due(CaptureState("capture", "done", newest_change=0)) is None


def test_a_changed_capture_fires_once_and_again_after_it_was_back_to_normal() -> None:
    watch = ChangeWatch("c", "new", min_interval=0.0, refire_after=60)
    assert watch.due(CaptureState("old", "done", 0))["reason"] == "capture changed"  # type: ignore[index]
    assert watch.due(CaptureState("old", "done", 0)) is None
    assert watch.due(CaptureState("new", "done", 0)) is None
    assert watch.due(CaptureState("new", "pending", 0))["reason"] == "table to read whole"  # type: ignore[index]

"""The triggers of a collection's DAG, run in Airflow's triggerer.

* ``VectorStoreIndexingTrigger`` builds a collection's indexes (vector and keyword); the build
  itself lives in :mod:`capstone.index_build`, shared with the sensor's non-deferrable mode.
* ``TableChangesTrigger`` is the ``AssetWatcher`` trigger of a collection that follows a table: it
  fires the collection's DAG when the table changed (:mod:`capstone.table_watch` decides when).
* ``TablePollTrigger`` is that trigger for a table followed by its ``updated_at`` column (no
  triggers on the table): it polls the table's newest ``updated_at`` and row count.

The triggerer imports them by their paths (``capstone.triggers.<name>``) from the installed
package, never from the DAGs folder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Hashable
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

from capstone.connections import ConnectionNotDefined, apostgres_params
from capstone.contracts import IndexEvent
from capstone.index_build import IndexParams, KeywordIndexParams, build_index
from capstone.table_watch import (
    ChangeWatch,
    listening,
    next_notification,
    read_state,
    read_states,
    read_watermark_state,
)

__all__ = ["TableChangesTrigger", "TablePollTrigger", "VectorStoreIndexingTrigger"]

log = logging.getLogger(__name__)


def _index_kwargs(params: IndexParams) -> dict[str, Any]:
    """The index's fields for :meth:`VectorStoreIndexingTrigger.serialize`; ``vector_type`` only
    when it is not ``vector``, and ``quantization`` (with ``dimension``) only when it is not
    ``none``, so that what a collection of plain vectors serializes is what earlier releases read."""
    fields = dataclasses.asdict(params)
    if fields["vector_type"] == "vector":
        del fields["vector_type"]
    if fields["quantization"] == "none":
        del fields["quantization"], fields["dimension"]
    return fields


class VectorStoreIndexingTrigger(BaseTrigger):
    """Build (or follow the build of) a collection's HNSW/IVFFlat index, and its keyword (GIN)
    index first when given; fire one event when done.

    :param collection_name: the collection, for messages.
    :param expected_count: rows that must have an embedding before the index counts as ready.
    :param index: the index to build: an :class:`capstone.index_build.IndexParams`, or its fields
        as a dict (how the triggerer re-creates the trigger from :meth:`serialize`).
    :param keyword_index: the keyword index (:class:`capstone.index_build.KeywordIndexParams` or
        its fields), or None for none (triggers serialized by earlier releases).
    :param connection_id: Airflow connection of the Postgres holding the collection.
    :param poll_interval: seconds between progress checks of the build.
    :param timeout: seconds before the build is cancelled and a ``timeout`` event fires.
    """

    def __init__(
        self,
        *,
        collection_name: str,
        expected_count: int,
        index: IndexParams | dict[str, Any],
        connection_id: str,
        poll_interval: float,
        timeout: float,
        keyword_index: KeywordIndexParams | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.collection_name = collection_name
        self.expected_count = int(expected_count)
        self.connection_id = connection_id
        self.poll_interval = float(poll_interval)
        self.timeout = float(timeout)
        # Validated here, so a bad spec fails the task when it defers, not later in the triggerer.
        self.params = index if isinstance(index, IndexParams) else IndexParams(**index)
        self.keyword = (
            keyword_index
            if keyword_index is None or isinstance(keyword_index, KeywordIndexParams)
            else KeywordIndexParams(**keyword_index)
        )

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and the keyword arguments that re-create this trigger in the triggerer."""
        return (
            "capstone.triggers.VectorStoreIndexingTrigger",
            {
                "collection_name": self.collection_name,
                "expected_count": self.expected_count,
                "index": _index_kwargs(self.params),
                "connection_id": self.connection_id,
                "poll_interval": self.poll_interval,
                "timeout": self.timeout,
                "keyword_index": None if self.keyword is None else dataclasses.asdict(self.keyword),
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Build the index and yield exactly one event: success, timeout or error."""
        keyword = f" and keyword index {self.keyword.qualified_index()}" if self.keyword else ""
        self.log.info(
            "collection %s: making index %s%s valid over %d vectors (timeout %gs)",
            self.collection_name,
            self.params.qualified_index(),
            keyword,
            self.expected_count,
            self.timeout,
        )
        try:
            target = await apostgres_params(self.connection_id)
        except Exception as exc:  # any failure to resolve the connection ends in an error event
            yield TriggerEvent(self._event(self._connection_error(exc)))
            return
        event = await build_index(
            target, self.params, self.expected_count, self.poll_interval, self.timeout, self.log, self.keyword
        )
        yield TriggerEvent(self._event(event))

    def _event(self, payload: IndexEvent) -> IndexEvent:
        return {**payload, "collection_name": self.collection_name}

    def _connection_error(self, exc: Exception) -> IndexEvent:
        if isinstance(exc, ConnectionNotDefined):
            message = f"collection {self.collection_name!r}, in the triggerer: {exc}"
        else:
            message = (
                f"collection {self.collection_name!r}: Airflow connection {self.connection_id!r} could not "
                f"be read in the triggerer ({type(exc).__name__}: {exc})"
            )
        return {"status": "error", "message": message, "terminal": isinstance(exc, ConnectionNotDefined)}


# Seconds between reconnection attempts of a watcher whose database went away.
RECONNECT_SECONDS = 5.0


class TableChangesTrigger(BaseEventTrigger):
    """Fire when the table a collection follows changed (an ``AssetWatcher``'s trigger).

    It never ends: each event is one asset event, which queues one run of the collection's DAG;
    that run takes every change queued when it starts. Several collections on one database share
    one listening connection where Airflow runs shared streams (3.3 and later); on older Airflow
    each trigger listens on a connection of its own.

    :param collection: the collection whose capture queue is watched.
    :param connection_id: Airflow connection of the followed table's database.
    :param capture: the capture the spec asks for (:func:`capstone.table_watch.capture_fingerprint`):
        another one installed (or none) fires a run, which installs it.
    :param min_interval: least seconds between two events: a burst of commits coalesces.
    :param check_every: seconds between looks at the queue without a notification.
    """

    def __init__(
        self,
        *,
        collection: str,
        connection_id: str,
        capture: str,
        min_interval: float = 1.0,
        check_every: float = 60.0,
    ) -> None:
        super().__init__()
        self.collection = collection
        self.connection_id = connection_id
        self.capture = capture
        self.min_interval = float(min_interval)
        self.check_every = float(check_every)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and the keyword arguments that re-create this trigger in the triggerer."""
        return (
            "capstone.triggers.TableChangesTrigger",
            {
                "collection": self.collection,
                "connection_id": self.connection_id,
                "capture": self.capture,
                "min_interval": self.min_interval,
                "check_every": self.check_every,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Listen on a connection of its own (Airflow without shared streams); fire when due."""
        watch = ChangeWatch(self.collection, self.capture, self.min_interval, self.check_every)
        self.log.info("collection %s: watching the capture queue of its table", self.collection)
        while True:
            try:
                params = await apostgres_params(self.connection_id)
                async with listening(params, f"capstone watch {self.collection}") as (conn, notifications):
                    while True:
                        payload = watch.due(await read_state(conn, self.collection))
                        if payload is not None:
                            yield self._fire(payload)
                        await asyncio.sleep(watch.wait_seconds())
                        await next_notification(notifications, self.check_every)
            except Exception as exc:  # the database or the connection's definition: try again, never end
                self.log.warning(
                    "collection %s: watching the capture queue failed (%s: %s); again in %gs",
                    self.collection,
                    type(exc).__name__,
                    exc,
                    RECONNECT_SECONDS,
                )
                await asyncio.sleep(RECONNECT_SECONDS)

    def shared_stream_key(self) -> Hashable | None:
        """Triggers of one database share its listening connection (Airflow 3.3 and later)."""
        return ("capstone-table-changes", self.connection_id, self.check_every)

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """Listen once for every watched collection of the database. Yields ``(everyone, states)``:
        the states of the collections notified (``everyone`` False), or of all collections every
        ``check_every`` seconds and after each (re)connection (``everyone`` True: a collection
        absent from it has no capture installed)."""
        connection_id, check_every = kwargs["connection_id"], float(kwargs.get("check_every", 60.0))
        while True:
            try:
                params = await apostgres_params(connection_id)
                async with listening(params, "capstone watch") as (conn, notifications):
                    log.info(
                        "listening for table changes on %s (connection %s)", params.describe(), connection_id
                    )
                    yield True, await read_states(conn)
                    while True:
                        notified = await next_notification(notifications, check_every)
                        log.info("table changes of %s", sorted(notified) or "(a regular look)")
                        if notified:
                            yield False, await read_states(conn, sorted(notified))
                        else:
                            yield True, await read_states(conn)
            except Exception as exc:  # reconnect; the subscribers re-read every state when it is back
                log.warning(
                    "listening for table changes (connection %s) failed (%s: %s); again in %gs",
                    connection_id,
                    type(exc).__name__,
                    exc,
                    RECONNECT_SECONDS,
                )
                await asyncio.sleep(RECONNECT_SECONDS)

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """This collection's events, from the states the shared connection reads; it looks on its
        own once first (a group it joins may not read every state for ``check_every`` seconds)."""
        from capstone.table_watch import CaptureState

        watch = ChangeWatch(self.collection, self.capture, self.min_interval, self.check_every)
        self.log.info("collection %s: watching the capture queue of its table (shared)", self.collection)
        try:
            params = await apostgres_params(self.connection_id)
            async with listening(params, f"capstone watch {self.collection}") as (conn, _):
                first = await read_state(conn, self.collection)
        except Exception as exc:  # the shared connection's readings follow
            self.log.warning("collection %s: first look failed (%s)", self.collection, exc)
        else:
            if (payload := watch.due(first)) is not None:
                yield self._fire(payload)
        async for everyone, states in shared_stream:
            self.log.debug("collection %s: states %s (everyone: %s)", self.collection, states, everyone)
            if self.collection not in states and not everyone:
                continue
            payload = watch.due(states.get(self.collection, CaptureState(None, None, 0)))
            if payload is not None:
                yield self._fire(payload)
                await asyncio.sleep(watch.wait_seconds())

    def _fire(self, payload: dict[str, Any]) -> TriggerEvent:
        self.log.info("collection %s: %s, a run is due", self.collection, payload["reason"])
        return TriggerEvent(payload)


class TablePollTrigger(BaseEventTrigger):
    """Fire when a table followed by its ``updated_at`` column changed (no triggers on the table).

    Every ``poll_seconds`` it compares the table's newest ``updated_at`` and row count with those
    of the last run that wrote (``capstone.table_watermarks``, in the store's database) and fires
    when they differ: an insert or update moves the mark, a delete the count. It fires once when
    the collection has not read the table yet (or reads other columns now), and again while a
    change it fired for is still unread ``refire_after`` seconds later (a paused DAG).

    :param collection: the collection following the table.
    :param connection_id: Airflow connection of the table's database.
    :param store_connection_id: Airflow connection of the collection's store (where the mark is).
    :param table: ``schema.table``; :param id_column:, :param content_column:, :param metadata_columns:
        and :param updated_at_column: as in the spec (for the fingerprint and the look).
    :param capture: :func:`capstone.table_watch.capture_fingerprint` of the spec's columns.
    :param poll_seconds: seconds between two looks. :param min_interval: least seconds between events.
    """

    def __init__(
        self,
        *,
        collection: str,
        connection_id: str,
        store_connection_id: str,
        table: str,
        updated_at_column: str,
        capture: str,
        poll_seconds: float = 30.0,
        min_interval: float = 1.0,
        refire_after: float = 60.0,
    ) -> None:
        super().__init__()
        self.collection = collection
        self.connection_id = connection_id
        self.store_connection_id = store_connection_id
        self.table = table
        self.updated_at_column = updated_at_column
        self.capture = capture
        self.poll_seconds = float(poll_seconds)
        self.min_interval = float(min_interval)
        self.refire_after = float(refire_after)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and the keyword arguments that re-create this trigger in the triggerer."""
        return (
            "capstone.triggers.TablePollTrigger",
            {
                "collection": self.collection,
                "connection_id": self.connection_id,
                "store_connection_id": self.store_connection_id,
                "table": self.table,
                "updated_at_column": self.updated_at_column,
                "capture": self.capture,
                "poll_seconds": self.poll_seconds,
                "min_interval": self.min_interval,
                "refire_after": self.refire_after,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Look every ``poll_seconds`` (the first look at once); fire when a run is due."""
        import asyncpg

        watch = ChangeWatch(
            self.collection,
            self.capture,
            self.min_interval,
            self.refire_after,
            "table changed",
            "table changed, still unread",
        )
        self.log.info(
            "collection %s: looking at %s every %gs", self.collection, self.table, self.poll_seconds
        )
        while True:
            try:
                source_params = await apostgres_params(self.connection_id)
                store_params = await apostgres_params(self.store_connection_id)
                name = f"capstone poll {self.collection}"
                conn = await asyncpg.connect(**source_params.asyncpg_arguments(name))
                store = conn
                if store_params.conninfo() != source_params.conninfo():
                    store = await asyncpg.connect(**store_params.asyncpg_arguments(name))
                try:
                    while True:
                        payload = watch.due(
                            await read_watermark_state(
                                store, conn, self.collection, self.table, self.updated_at_column
                            )
                        )
                        if payload is not None:
                            yield self._fire(payload)
                        await asyncio.sleep(max(self.poll_seconds, watch.wait_seconds()))
                finally:
                    for opened in {id(conn): conn, id(store): store}.values():
                        await opened.close(timeout=5)
            except Exception as exc:  # the database or the connection's definition: try again, never end
                self.log.warning(
                    "collection %s: looking at %s failed (%s: %s); again in %gs",
                    self.collection,
                    self.table,
                    type(exc).__name__,
                    exc,
                    RECONNECT_SECONDS,
                )
                await asyncio.sleep(RECONNECT_SECONDS)

    def _fire(self, payload: dict[str, Any]) -> TriggerEvent:
        self.log.info("collection %s: %s, a run is due", self.collection, payload["reason"])
        return TriggerEvent(payload)

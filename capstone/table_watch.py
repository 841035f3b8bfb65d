"""Watching a followed table's capture queue from Airflow's triggerer: when a run is due.

:class:`capstone.triggers.TableChangesTrigger` (an ``AssetWatcher``'s trigger) fires a collection's
DAG when its followed table changed. It reads the state :mod:`capstone.table_source` keeps in the
table's database, over asyncpg (the triggerer's event loop), and decides with :class:`ChangeWatch`:

* a run is due when the capture is not installed (or is not the one the spec asks for) or a
  snapshot is pending: it fires once for that, and again only after the state was back to normal;
* or when the queue holds unclaimed changes newer than the last ones it fired for: a run claims
  everything queued when it starts, so changes that arrive while a run is queued or running fire
  again only if that run did not take them;
* or when changes it fired for are still unclaimed ``check_every`` seconds later (an event that
  led to no run: Airflow drops the asset events of a paused DAG);
* never more often than once per ``min_interval`` seconds: a burst of commits coalesces.

It listens on :data:`~capstone.table_source.CHANNEL` and also looks every ``check_every`` seconds, so
a notification missed (a reconnect, a triggerer restart) delays a run by at most that much. On
start it looks first: changes committed while it was down (or the DAG paused) fire at once.

A table followed by its ``updated_at`` column (no triggers, no queue) is watched by
:class:`capstone.triggers.TablePollTrigger` with the same :class:`ChangeWatch`: every
``poll_seconds`` :func:`read_watermark_state` compares the table's newest ``updated_at`` and row
count with the last run's mark.

This module imports asyncpg lazily: DAG files import the trigger, and parsing stays light.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capstone.connections import PostgresParams
    from capstone.settings import TableSourceSettings

__all__ = [
    "CHANNEL",
    "CaptureState",
    "ChangeWatch",
    "capture_fingerprint",
    "listening",
    "next_notification",
    "read_state",
    "read_states",
    "read_watermark_state",
]

# After a notification, how long to gather the others of its burst before reading the queue.
GATHER_SECONDS = 0.1
# The channel every capture trigger notifies; the payload is the collection's name.
CHANNEL = "capstone_source_changes"


def capture_fingerprint(source: TableSourceSettings) -> str:
    """What the capture triggers capture (table, id, content and metadata columns), as a short hash:
    another one re-installs the capture and reads the whole table again."""
    parts = [source.qualified, source.id_column, source.content_column, *source.metadata_columns]
    if source.updated_at_column is not None:  # (a capture by triggers keeps the fingerprint it had)
        parts.append(f"watermark:{source.updated_at_column}")
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CaptureState:
    """A collection's capture, as the trigger sees it: ``capture`` and ``snapshot`` of its row in
    ``capstone.table_sources`` (None: no row), the newest unclaimed change (0: none) and how long
    the oldest unclaimed one has waited. For a table followed by updated_at (:func:`read_watermark_state`),
    ``newest_change`` is a signature of the table's newest ``updated_at`` and row count where they
    differ from the last run's (0: they do not)."""

    capture: str | None
    snapshot: str | None
    newest_change: int
    oldest_waiting_seconds: float = 0.0


class ChangeWatch:
    """When a collection's DAG should run, from successive :class:`CaptureState` readings."""

    def __init__(
        self,
        collection: str,
        capture: str,
        min_interval: float,
        refire_after: float,
        pending_reason: str = "changes queued",
        still_reason: str = "changes still queued",
    ) -> None:
        self.collection = collection
        self.capture = capture
        self.min_interval = min_interval
        self.refire_after = refire_after
        self.pending_reason = pending_reason
        self.still_reason = still_reason
        self._fired_for: set[str] = set()
        self._fired_change = 0
        self._last_fired = float("-inf")

    def wait_seconds(self) -> float:
        """How long to wait before the next event may fire."""
        return max(0.0, self._last_fired + self.min_interval - time.monotonic())

    def due(self, state: CaptureState) -> dict[str, Any] | None:
        """The event's payload when a run is due, else None (and remembers what it fired for)."""
        reason = self._unusual(state)
        if reason is None:
            self._fired_for.clear()
            if state.newest_change and state.newest_change != self._fired_change:
                reason = self.pending_reason
            elif state.newest_change and self._left_waiting(state):
                reason = self.still_reason
            else:
                return None
        elif reason in self._fired_for:
            return None
        self._fired_for.add(reason)
        if state.newest_change:  # (the queue's newest unclaimed change only grows while unclaimed)
            self._fired_change = state.newest_change
        self._last_fired = time.monotonic()
        return {"collection": self.collection, "reason": reason, "newest_change": state.newest_change}

    def _left_waiting(self, state: CaptureState) -> bool:
        """Changes fired for are still unclaimed long after: the event led to no run (Airflow drops
        the events of a paused DAG, and a triggerer may die before it records one)."""
        since_fired = time.monotonic() - self._last_fired
        return state.oldest_waiting_seconds >= self.refire_after and since_fired >= self.refire_after

    def _unusual(self, state: CaptureState) -> str | None:
        if state.capture is None:
            return "capture not installed"
        if state.capture != self.capture:
            return "capture changed"
        if state.snapshot == "pending":
            return "table to read whole"
        return None


_ALL_STATES_SQL = """
SELECT s.collection, s.capture, s.snapshot, coalesce(q.newest, 0),
       coalesce(extract(epoch FROM clock_timestamp() - q.oldest), 0)
FROM capstone.table_sources s
LEFT JOIN LATERAL (
    SELECT max(seq) AS newest, min(queued_at) AS oldest FROM capstone.source_changes
    WHERE collection = s.collection AND run_key IS NULL
) q ON true
"""
_STATE_SQL = _ALL_STATES_SQL + "WHERE s.collection = ANY($1::text[])"


async def read_states(conn: Any, collections: list[str] | None = None) -> dict[str, CaptureState]:
    """The states of ``collections`` (all of them for None); a collection without a row is absent,
    and so is every collection when the capture catalog does not exist yet."""
    import asyncpg

    try:
        if collections is None:
            rows = await conn.fetch(_ALL_STATES_SQL)
        else:
            rows = await conn.fetch(_STATE_SQL, collections)
    except asyncpg.UndefinedTableError:
        return {}
    return {row[0]: CaptureState(row[1], row[2], int(row[3]), float(row[4])) for row in rows}


async def read_state(conn: Any, collection: str) -> CaptureState:
    """The state of one collection (no row: nothing installed)."""
    states = await read_states(conn, [collection])
    return states.get(collection, CaptureState(None, None, 0))


@asynccontextmanager
async def listening(
    params: PostgresParams, application_name: str
) -> AsyncIterator[tuple[Any, asyncio.Queue[str]]]:
    """An asyncpg connection listening on the capture channel, and the queue its notifications'
    payloads (collection names) arrive in."""
    import asyncpg

    notifications: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(**params.asyncpg_arguments(application_name))
    try:
        await conn.add_listener(
            CHANNEL, lambda _conn, _pid, _channel, payload: notifications.put_nowait(payload)
        )
        yield conn, notifications
    finally:
        await conn.close(timeout=5)


async def next_notification(notifications: asyncio.Queue[str], timeout: float) -> set[str]:
    """The collections notified within ``timeout`` seconds (empty if none), with those notified in
    the next :data:`GATHER_SECONDS` (the rest of a burst of commits)."""
    try:
        first = await asyncio.wait_for(notifications.get(), timeout)
    except TimeoutError:
        return set()
    await asyncio.sleep(GATHER_SECONDS)
    notified = {first}
    while not notifications.empty():
        notified.add(notifications.get_nowait())
    return notified


_WATERMARK_SQL = """
SELECT capture, mark, row_count, extract(epoch FROM clock_timestamp() - updated_at)
FROM capstone.table_watermarks WHERE collection = $1
"""


async def read_watermark_state(
    store: Any, source_conn: Any, collection: str, table: str, updated_at_column: str
) -> CaptureState:
    """The state of a collection that follows ``table`` (``schema.table``) by ``updated_at_column``:
    the last run's mark and row count (in ``capstone.table_watermarks`` of the store's database,
    over ``store``), compared with the table's newest ``updated_at`` and count (over
    ``source_conn``: one query; an index on the column makes its max instant, the count reads the
    table or its primary key)."""
    import asyncpg

    from capstone.index_build import quote_ident

    try:
        row = await store.fetchrow(_WATERMARK_SQL, collection)
    except asyncpg.UndefinedTableError:
        row = None
    if row is None or row[0] is None:
        return CaptureState(None, None, 0)
    schema, name, column = *table.split(".", 1), updated_at_column
    try:
        # As timestamptz: a timestamp column's mark (no offset) is read in this session's time zone,
        # as the column is, so the comparison holds whatever the zone of the run that wrote it.
        newest, moved, count = await source_conn.fetchrow(
            f"SELECT max({quote_ident(column)})::text, max({quote_ident(column)})::timestamptz IS "
            f"DISTINCT FROM $1::text::timestamptz, count(*) FROM {quote_ident(schema)}.{quote_ident(name)}",
            row[1],
        )
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        return CaptureState("table or column missing", "done", 0)  # the run says which, with the fix
    if not moved and count == row[2]:
        return CaptureState(row[0], "done", 0)
    signature = zlib.crc32(f"{newest}|{count}".encode()) or 1
    return CaptureState(row[0], "done", signature, float(row[3] or 0))

"""``VectorStoreIndexingSensor``: the ``wait_for_indexing`` task of every collection DAG.

It checks synchronously first (a valid index matching the spec that holds every upserted vector,
and a valid keyword index, mean there is nothing to wait for), otherwise defers to
``VectorStoreIndexingTrigger``, which builds the indexes in the triggerer. With
``deferrable=False``, or over at most ``in_worker_max_rows`` rows, it runs the same build coroutine
in the worker instead: a small index builds in less time than the deferral's round trip (the
task's exit, the triggerer picking the trigger up, the scheduler queueing the task again and a new
task process starting) takes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from capstone.connections import postgres_params
from capstone.contracts import IndexEvent
from capstone.errors import is_terminal
from capstone.index_build import IndexParams, KeywordIndexParams, build_index, check_index
from capstone.triggers import VectorStoreIndexingTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["VectorStoreIndexingSensor"]

# Airflow's own deferral timeout is set a little beyond the trigger's, so that on a slow build the
# trigger's clean timeout (cancel, drop the INVALID index, clear message) fires first.
_DEFERRAL_GRACE_S = 60.0


class VectorStoreIndexingSensor(BaseSensorOperator):
    """Wait until the collection's vector index (and keyword index) is valid and holds
    ``expected_count`` vectors.

    :param collection_name: the collection, for messages.
    :param expected_count: vectors the upsert wrote (templated; an XComArg or a Jinja string).
    :param index: the index to build (:meth:`capstone.index_build.IndexParams.of` the collection).
    :param keyword_index: the keyword index to build beside it (``KeywordIndexParams.of``), or None.
    :param connection_id: Airflow connection of the Postgres holding the collection.
    :param poll_interval: seconds between progress checks of the build.
    :param timeout: seconds the build may take before it is cancelled and the task fails.
    :param deferrable: build in the triggerer (True) or in this worker (False).
    :param in_worker_max_rows: build in this worker anyway when the index covers at most this many
        rows (0: never).
    :param table: the table to index instead of the one ``index`` names (templated: the upsert task
        says which version of the collection the run wrote to); None keeps ``index``'s.

    The returned value (pushed to XCom) is the trigger's success event.
    """

    template_fields: Sequence[str] = ("expected_count", "table")
    ui_color = "#d8e9f3"

    def __init__(
        self,
        *,
        collection_name: str,
        expected_count: int | str | Any,
        index: IndexParams,
        connection_id: str,
        poll_interval: float,
        timeout: float,
        deferrable: bool = True,
        in_worker_max_rows: int = 0,
        keyword_index: KeywordIndexParams | None = None,
        table: str | Any | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(timeout=timeout, poke_interval=poll_interval, **kwargs)
        self.collection_name = collection_name
        self.expected_count = expected_count  # resolved at run time: may be an XComArg or a string
        self.connection_id = connection_id
        self.poll_interval = float(poll_interval)
        self.deferrable = deferrable
        self.in_worker_max_rows = in_worker_max_rows
        self.index_params = index
        self.keyword_params = keyword_index
        self.table = table  # resolved at run time: may be an XComArg or a string

    def execute(self, context: Context) -> IndexEvent:
        """Return at once when the index is ready; otherwise build it (deferred or in-process)."""
        expected = self._expected_count()
        self._use_rendered_table()
        try:
            target = postgres_params(self.connection_id)
            ready = asyncio.run(
                check_index(target, self.index_params, expected, self.log, self.keyword_params)
            )
        except Exception as exc:
            if is_terminal(exc):
                raise AirflowFailException(f"collection {self.collection_name!r}: {exc}") from exc
            raise
        if ready is not None:
            self.log.info(
                "collection %s: index already valid over %d vectors", self.collection_name, expected
            )
            return ready
        if not self.deferrable or expected <= self.in_worker_max_rows:
            if self.deferrable:
                self.log.info(
                    "collection %s: building the index over %d rows in this task (index.in_worker_max_rows "
                    "is %d: a deferral would take longer)",
                    self.collection_name,
                    expected,
                    self.in_worker_max_rows,
                )
            event = asyncio.run(
                build_index(
                    target,
                    self.index_params,
                    expected,
                    self.poll_interval,
                    self.timeout,
                    self.log,
                    self.keyword_params,
                )
            )
            return self.execute_complete(context, event)
        self.defer(
            trigger=self._trigger(expected),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout + self.poll_interval + _DEFERRAL_GRACE_S),
        )

    def execute_complete(self, context: Context, event: IndexEvent | None = None) -> IndexEvent:
        """Resume after the trigger: return the success event, raise on a timeout or error event."""
        if not event or "status" not in event:
            raise AirflowException(
                f"collection {self.collection_name!r}: the index trigger ended without an event; "
                "see the triggerer log"
            )
        if event["status"] != "success":
            message = (
                f"collection {self.collection_name!r}: index build {event['status']}: "
                f"{event.get('message', 'no message')}"
            )
            # A refused login or a name taken by another table's index: a retry cannot help.
            raise (AirflowFailException if event.get("terminal") else AirflowException)(message)
        self.log.info(
            "collection %s: index %s valid with %s vectors (%s bytes); keyword index %s (%s bytes)",
            self.collection_name,
            event.get("index_name"),
            event.get("indexed_count"),
            event.get("index_size_bytes"),
            event.get("keyword_index_name", "none"),
            event.get("keyword_index_size_bytes", 0),
        )
        return event

    def _use_rendered_table(self) -> None:
        """Point the index parameters at the rendered ``table`` (the run's collection version)."""
        table = str(self.table).strip() if self.table else ""
        if not table or table == "None" or table == self.index_params.table:
            return
        self.index_params = dataclasses.replace(self.index_params, table=table)
        if self.keyword_params is not None:
            self.keyword_params = dataclasses.replace(self.keyword_params, table=table)

    def _expected_count(self) -> int:
        # Jinja renders to a string unless the DAG renders native objects: accept both.
        value = self.expected_count
        try:
            if isinstance(value, bool):
                raise TypeError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise AirflowException(
                f"collection {self.collection_name!r}: expected_count must be a whole number of vectors "
                f"(the upsert task's count), got {value!r}"
            ) from None

    def _trigger(self, expected: int) -> VectorStoreIndexingTrigger:
        return VectorStoreIndexingTrigger(
            collection_name=self.collection_name,
            expected_count=expected,
            index=self.index_params,
            connection_id=self.connection_id,
            poll_interval=self.poll_interval,
            timeout=self.timeout,
            keyword_index=self.keyword_params,
        )

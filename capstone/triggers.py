"""``VectorStoreIndexingTrigger``: builds a collection's indexes (vector and keyword) in Airflow's
triggerer.

The triggerer imports this class by its path, ``capstone.triggers.VectorStoreIndexingTrigger``,
from the installed package (never from the DAGs folder). The build itself lives in
:mod:`capstone.index_build`, shared with the sensor's non-deferrable mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from capstone.connections import ConnectionNotDefined, apostgres_params
from capstone.contracts import IndexEvent
from capstone.index_build import IndexParams, KeywordIndexParams, build_index

__all__ = ["VectorStoreIndexingTrigger"]


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

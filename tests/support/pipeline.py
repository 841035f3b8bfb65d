"""The pipeline's task functions called by hand, in DAG order, without Airflow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from capstone.contracts import EmbeddingTotals, UpsertResult
from capstone.documents import BatchLocation
from capstone.pipeline import (
    NothingToIndex,
    aggregate_manifests,
    embed_batch,
    load_documents,
    prepare_chunks,
    upsert_vectors,
)
from capstone.settings import CollectionSettings

__all__ = ["run_pipeline", "run_until_upsert"]


def run_until_upsert(
    settings: CollectionSettings, run_key: str, batches: Sequence[dict[str, Any]]
) -> EmbeddingTotals | None:
    """Run load -> prepare -> embed (every batch) -> aggregate; the aggregate to upsert, or None.

    None when the batches hold nothing new (the DAG would skip the rest of the run).
    """
    load_documents(settings, run_key, [BatchLocation.from_extra(extra) for extra in batches])
    try:
        prepared = prepare_chunks(settings, run_key, max_batches=1024)
    except NothingToIndex:
        return None
    manifests = [embed_batch(settings, run_key, descriptor) for descriptor in prepared["batches"]]
    return aggregate_manifests(prepared["summary"], manifests)


def run_pipeline(
    settings: CollectionSettings, run_key: str, batches: Sequence[dict[str, Any]]
) -> UpsertResult:
    """The whole write path of one run (no index build); returns the upsert's result."""
    aggregate = run_until_upsert(settings, run_key, batches)
    assert aggregate is not None, "nothing to index"
    return upsert_vectors(settings, aggregate)

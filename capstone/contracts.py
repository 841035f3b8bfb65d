"""What each task of a collection's DAG hands the next: the XCom contracts, typed.

Each is a ``TypedDict``, so what travels through XCom stays a plain JSON object while mypy checks
every producer and consumer. Bulk data never appears here (it stays in the staging tables):
descriptors, counts, ids (at most :data:`MAX_LISTED` of a kind) and small reports.

    load_enriched_documents -> LoadResult
    prepare_chunks          -> list[BatchDescriptor] (mapped over), XCom "summary" -> PrepareSummary
    generate_embedding      -> Manifest (one per mapped task)
    aggregate_embeddings    -> EmbeddingTotals
    batch_upsert_vectors    -> UpsertResult
    wait_for_indexing       -> IndexEvent (the trigger's event)
    validate_index_health   -> ValidationReport
    publish_indexed_asset   -> IndexedEvent (also the extra of the <collection>.indexed event)
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "MAX_LISTED",
    "BatchDescriptor",
    "EmbeddingTotals",
    "IndexEvent",
    "IndexedEvent",
    "LoadResult",
    "Manifest",
    "PrepareSummary",
    "Prepared",
    "Rejection",
    "UpsertResult",
    "ValidationReport",
    "ValidationSummary",
    "VersionRef",
]

# How many ids (rejected documents, refused chunks) a contract lists in full; counts stay exact.
MAX_LISTED = 50


class Rejection(TypedDict):
    """A document set aside, where it was read and why."""

    id: str | None
    source: str
    reason: str


class VersionRef(TypedDict):
    """The version of the collection a run writes to (see :mod:`capstone.versions`): its number and
    table, ``live`` or ``building``, whether it holds the live version's chunks yet (``seeded``), the
    key its chunk hashes are computed with, and its embedding fingerprint."""

    number: int
    table: str
    status: str
    seeded: bool
    hash_key: str
    fingerprint: str


class LoadResult(TypedDict):
    """``load_enriched_documents``: what the run's batches held."""

    run_key: str
    sources: list[str]
    documents: int
    deleted_documents: int
    chunks: int
    rejected_count: int
    rejected: list[Rejection]
    hash_key: NotRequired[str]  # what the staged chunks' content hashes were computed with


class BatchDescriptor(TypedDict):
    """One mapped ``generate_embedding`` task's share: a batch number, its chunk count, and how
    many tasks share the run (what a task's share of the worker's cores follows)."""

    batch_no: int
    chunks: int
    tasks: int
    table: NotRequired[str]  # the version table the batch's chunks are compared with


class PrepareSummary(TypedDict):
    """``prepare_chunks``' counts (its ``summary`` XCom)."""

    run_key: str
    staged_chunks: int
    to_embed: int
    unchanged: int
    to_delete: int
    version: NotRequired[VersionRef]
    seeded: NotRequired[int]  # chunks copied from the live version into a new one


class Prepared(TypedDict):
    """What :func:`capstone.pipeline.prepare_chunks` returns: the counts and the batches."""

    summary: PrepareSummary
    batches: list[BatchDescriptor]


class Manifest(TypedDict):
    """``generate_embedding``: one mapped task's outcome. ``embedded``: vectors its share has staged
    over all tries (a retry resumes); ``failed_ids``: chunks the API refused."""

    batch_no: int
    embedded: int
    failed: int
    failed_ids: list[str]
    seconds: float


class EmbeddingTotals(TypedDict):
    """``aggregate_embeddings``: totals over every batch."""

    run_key: str
    batches: int
    embedded: int
    expected: int
    failed_count: int
    failed_ids: list[str]
    to_delete: int
    version: NotRequired[VersionRef]
    seeded: NotRequired[int]


class UpsertResult(TypedDict):
    """``batch_upsert_vectors``: rows merged and deleted; ``expected_count`` rows the table holds."""

    run_key: str
    upserted: int
    failed: int
    deleted: int
    batches: int
    expected_count: int
    version: NotRequired[VersionRef]
    table: NotRequired[str]  # the version table the rows went to (what the index is built on)


class IndexEvent(TypedDict):
    """The index build's outcome (the trigger's event payload, the sensor's return value).

    A success carries the ANN index's facts (and the keyword index's name and size); a
    ``timeout`` or ``error`` carries ``message`` and ``terminal`` (a retry cannot help).
    """

    status: Literal["success", "timeout", "error"]
    collection_name: NotRequired[str]
    message: NotRequired[str]
    terminal: NotRequired[bool]
    index_name: NotRequired[str]
    indexed_count: NotRequired[int]
    index_size_bytes: NotRequired[int]
    duration_s: NotRequired[float]
    freshness_ms: NotRequired[int | None]
    builds_started: NotRequired[int]
    keyword_index_name: NotRequired[str]
    keyword_index_size_bytes: NotRequired[int]


# The part of the validation report the ``indexed`` event carries: each check's name
# (``vector_count``, ``query_relevance_<id>``, ``recall_at_k``, ``index_freshness``) -> pass, warn,
# fail or skip; ``failed`` and ``warned`` (lists of check names); ``recall``; the query-time knob
# (``ef_search`` or ``probes``) -> its value; and ``search_mode``, the mode sample queries ran in.
# Its keys depend on the spec, hence a plain mapping.
ValidationSummary = dict[str, Any]


class ValidationReport(TypedDict):
    """``validate_index_health``: index facts, every check with its numbers, and the summary."""

    collection: str
    table: str
    version: NotRequired[dict[str, Any]]  # number and table of the collection version validated
    index: dict[str, Any]
    search: dict[str, Any]
    checks: dict[str, dict[str, Any]]
    summary: ValidationSummary


class IndexedEvent(TypedDict):
    """``publish_indexed_asset``: the extra of the ``<collection>.indexed`` event, a run's summary."""

    collection: str
    run_id: str
    model: str
    provider: str
    sources: list[str]
    documents: int
    rejected_documents: int
    deleted_documents: int
    chunks_embedded: int
    chunks_failed: int
    failed_chunk_ids: list[str]
    chunks_unchanged: int
    rows_upserted: int
    rows_deleted: int
    vector_count: int
    index_name: str | None
    index_size_bytes: int | None
    validation: ValidationSummary
    table: NotRequired[str]  # the stable name consumers query
    connection_id: NotRequired[str]  # the Airflow connection of the collection's database
    version: NotRequired[int | None]  # the version this run wrote to
    live_version: NotRequired[int | None]  # the version the stable name serves after the run
    switched: NotRequired[bool]  # whether this run switched the stable name to its version

"""What each task of a collection's DAG does, as plain functions of its :class:`CollectionSettings`.

The DAG factory wraps these in Airflow tasks; they take and return small JSON-able dicts
(descriptors and counts) while the bulk data goes through the staging tables of
:mod:`capstone.store`. Every function can be re-run for the same run: it replaces what it wrote.

A run writes to one version of the collection (:mod:`capstone.versions`): ``prepare_chunks``
resolves it from the spec's embedding fingerprint (the live version, or a new one being built
beside it; creating or adopting its table, once the table is known to be this collection's),
``load_documents`` only reads the hash key of its chunks, and later tasks pass it on (``version``
in their results); the store, the index build and
validation then work on that version's table, never on the stable name consumers read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import psycopg

from capstone import store, versions
from capstone.chunking import Chunker
from capstone.connections import connect, postgres_params
from capstone.contracts import (
    MAX_LISTED,
    BatchDescriptor,
    EmbeddingTotals,
    LoadResult,
    Manifest,
    Prepared,
    PrepareSummary,
    UpsertResult,
    VersionRef,
)
from capstone.documents import (
    DUPLICATE_REASON,
    BatchLocation,
    EnrichedDocument,
    RejectedDocument,
    read_batch,
    validate_documents,
)
from capstone.embeddings.base import Embedder
from capstone.errors import TerminalError, is_terminal
from capstone.settings import CollectionSettings
from capstone.table_source import TableChanges, WatermarkChanges, acknowledge, acknowledge_watermark

__all__ = [
    "MassDeleteRefused",
    "MergeRefused",
    "NothingToIndex",
    "TooManyRejected",
    "aggregate_manifests",
    "embed_batch",
    "load_documents",
    "prepare_chunks",
    "run_key_for",
    "upsert_vectors",
]

log = logging.getLogger(__name__)

# How often reading a long batch says how far it got.
LOAD_PROGRESS_SECONDS = 10.0


class NothingToIndex(Exception):
    """The run's batches hold no new, changed or removed chunks: nothing to embed or write."""


class TooManyRejected(TerminalError):
    """A batch rejected more than ``source.max_rejected_fraction`` of its documents: likely not a
    batch of enriched documents at all (a wrong path, a changed format); nothing was written."""


class MergeRefused(TerminalError):
    """Upsert batches failed for a reason no retry changes (a privilege, a column): nothing of the
    failed batches was written."""


class MassDeleteRefused(TerminalError):
    """The run would delete more than ``store.max_delete_fraction`` of the collection's rows; nothing
    was written."""


def run_key_for(dag_id: str, run_id: str) -> str:
    """A short stable key naming one DAG run's staging tables."""
    return hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:20]


def _connect(settings: CollectionSettings) -> psycopg.Connection:
    params = postgres_params(settings.store.connection_id)
    return connect(params, application_name=f"capstone {settings.collection}")


# -- load_enriched_documents ----------------------------------------------------------------


def _chunk_limit(settings: CollectionSettings) -> int:
    """chunking.max_chunk_chars, lowered to what the model accepts when the API would reject more.

    Only a hard API limit counts: sentence-transformers truncates long inputs by design, and
    loading a local model in this task just to ask would cost seconds on every run.
    """
    if settings.embedding.provider == "openai":
        from capstone.embeddings.openai_api import input_limit

        model_limit = input_limit(settings.embedding.model)
        if model_limit is not None:
            return min(settings.chunking.max_chunk_chars, model_limit)
    return settings.chunking.max_chunk_chars


def load_documents(
    settings: CollectionSettings, run_key: str, locations: Sequence[BatchLocation]
) -> LoadResult:
    """Read the batches, set bad documents aside, stage the good ones; returns counts and reasons.

    ``locations`` are newest first: when two batches carry the same document id, the newest wins.
    Raises :class:`TooManyRejected` (and drops what it staged) when a batch rejects more than
    ``max_rejected_fraction`` of its documents.
    """
    followed = _table_changes(settings, run_key)
    reader = _BatchReader(settings, locations, followed)
    with _connect(settings) as conn:
        store.ensure_staging(conn)
        stale = store.drop_stale_staging(conn, settings.collection)
        if stale:
            log.info("dropped the staging tables of %d abandoned runs", stale)
        # Read-only: the version's tables are created (or adopted) by prepare_chunks, after the batch
        # was read, so a run that fails here has written nothing but its staging.
        hash_key = versions.hash_key_for(conn, settings)
        document_count, chunk_count = store.stage_documents(
            conn, run_key, settings.collection, reader.documents(), hash_key
        )
        refusal = reader.too_many_rejected(settings.source.max_rejected_fraction)
        if refusal is not None:
            store.drop_run_staging(conn, run_key)
            raise refusal
    documents, deleted, rejected = document_count - reader.deleted, reader.deleted, reader.rejected
    sources = [location.describe() for location in locations]
    if followed is not None:
        sources.insert(0, followed.summary())
    log.info(
        "staged %d documents (%d chunks) from %d source(s); %d deleted upstream; %d set aside",
        documents,
        chunk_count,
        len(sources),
        deleted,
        len(rejected),
    )
    return {
        "run_key": run_key,
        "sources": sources,
        "documents": documents,
        "deleted_documents": deleted,
        "chunks": chunk_count,
        "rejected_count": len(rejected),
        "rejected": [item.as_dict() for item in rejected[:MAX_LISTED]],
        "hash_key": hash_key,
    }


def _table_changes(settings: CollectionSettings, run_key: str) -> TableChanges | None:
    """What the run reads of the table the collection follows, if it follows one."""
    followed = settings.source.table
    if followed is None:
        return None

    def indexed_ids() -> list[str]:
        with _connect(settings) as conn:
            return store.document_ids(conn, settings.store_table)

    if followed.updated_at_column is not None:
        store_connection = settings.store.connection_id
        return WatermarkChanges(settings.collection, followed, run_key, indexed_ids, store_connection)
    return TableChanges(settings.collection, followed, run_key, indexed_ids)


def _acknowledge_table_changes(settings: CollectionSettings, run_key: str) -> None:
    """The run's writes committed: the table changes it read leave the capture queue (or, for a
    table followed by updated_at, the mark it read becomes current)."""
    followed = settings.source.table
    if followed is None:
        return
    if followed.updated_at_column is not None:
        acknowledge_watermark(settings.collection, settings.store.connection_id, run_key)
    else:
        acknowledge(settings.collection, followed, run_key)


@contextlib.contextmanager
def _acknowledged_when_nothing_to_index(settings: CollectionSettings, run_key: str) -> Iterator[None]:
    """A run with nothing to write ends here: the table changes it read (none changed a chunk)
    leave the capture queue all the same."""
    try:
        yield
    except NothingToIndex:
        _acknowledge_table_changes(settings, run_key)
        raise


def _resolve_version(conn: psycopg.Connection, settings: CollectionSettings) -> versions.Version:
    """The version of the collection this run writes to (see :mod:`capstone.versions`), once the
    table is known to be this collection's (:func:`capstone.registry.check_table_owner`)."""
    from capstone import registry

    registry.check_table_owner(conn, settings.collection, settings.store.schema, settings.store.table)
    version = versions.resolve(conn, settings)
    log.info(
        "writing to version %d of %s (%s, %s)",
        version.number,
        settings.store_table.qualified,
        version.table,
        version.status if version.status == "live" else "being built beside the live version",
    )
    return version


def _version_of(conn: psycopg.Connection, settings: CollectionSettings, ref: VersionRef | None) -> VersionRef:
    """The version a task works on: what the run's earlier task said, or (for a caller that passes
    none) the one the settings resolve to."""
    return ref if ref is not None else _resolve_version(conn, settings).ref


class _BatchTally:
    """Documents read from one batch, and the ones set aside."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.documents = 0
        self.rejected: list[RejectedDocument] = []


class _BatchReader:
    """Streams the documents of a run's batches, counting per batch what was read and set aside,
    and saying how far it got every :data:`LOAD_PROGRESS_SECONDS`."""

    def __init__(
        self,
        settings: CollectionSettings,
        locations: Sequence[BatchLocation],
        followed: TableChanges | None = None,
    ) -> None:
        self._settings = settings
        # The followed table's rows first: they are newer than any batch announced before the run.
        self._sources: list[tuple[str, Callable[[], Iterator[tuple[str, Any]]]]] = [
            *([(followed.describe(), followed.records)] if followed is not None else []),
            *((location.describe(), functools.partial(read_batch, location)) for location in locations),
        ]
        self._tallies = [_BatchTally(name) for name, _ in self._sources]
        self._current = _BatchTally("")
        self.rejected: list[RejectedDocument] = []
        self.deleted = 0

    def documents(self) -> Iterator[EnrichedDocument]:
        """The valid documents and tombstones, in batch order; rejections are kept aside."""
        checked = validate_documents(
            self._records(),
            max_chunk_chars=_chunk_limit(self._settings),
            max_chunks=self._settings.chunking.max_chunks_per_document,
            split=Chunker(self._settings.chunking, self._settings.embedding).split,
        )
        for result in checked:
            if isinstance(result, RejectedDocument):
                log.warning("set aside %s (%s): %s", result.id or "<no id>", result.source, result.reason)
                self.rejected.append(result)
                if result.reason == DUPLICATE_REASON:
                    # A copy superseded by a newer one (say, the same batch sent twice) is not a
                    # sign of a broken batch: it counts neither way for the reject guard.
                    self._current.documents -= 1
                else:
                    self._current.rejected.append(result)
            else:
                self.deleted += result.deleted
                yield result

    def _records(self) -> Iterator[tuple[str, Any]]:
        started = last_report = time.monotonic()
        read = 0
        for (name, records), tally in zip(self._sources, self._tallies, strict=True):
            log.info("reading %s", name)
            self._current = tally
            for record in records():
                tally.documents += 1
                yield record
                read += 1
                if time.monotonic() - last_report >= LOAD_PROGRESS_SECONDS:
                    last_report = time.monotonic()
                    rate = read / max(last_report - started, 1e-9)
                    log.info(
                        "read %d documents so far (%.0f documents/s), %d set aside",
                        read,
                        rate,
                        len(self.rejected),
                    )

    def too_many_rejected(self, max_fraction: float) -> TooManyRejected | None:
        """The refusal for the first batch that rejected more than ``max_fraction``, if any."""
        for tally in self._tallies:
            if tally.documents and len(tally.rejected) / tally.documents > max_fraction:
                reasons = "; ".join(f"{item.source}: {item.reason}" for item in tally.rejected[:3])
                return TooManyRejected(
                    f"batch {tally.name}: {len(tally.rejected)} of {tally.documents} documents were "
                    f"rejected, more than source.max_rejected_fraction ({max_fraction:g}) allows, so nothing "
                    f"was written. First reasons: {reasons}. Fix the batch upstream (or its path in the "
                    "asset event); raise source.max_rejected_fraction only if so many bad documents are "
                    "expected"
                )
        return None


# -- prepare_chunks -------------------------------------------------------------------------


def prepare_chunks(
    settings: CollectionSettings,
    run_key: str,
    max_batches: int,
    *,
    allow_mass_delete: bool = False,
    hash_key: str | None = None,
) -> Prepared:
    """Decide which staged chunks need embedding and cut them into batches for mapping.

    First resolves the collection version the run writes to (:func:`capstone.versions.resolve`:
    creating or adopting its table where needed); ``hash_key`` is the key ``load_documents`` hashed
    the staged chunks with, which must still be the version's. A new version being built is
    *seeded*: the live version's chunks that the run's documents do not replace are staged too, so
    that every chunk is embedded with the new model.

    Raises :class:`NothingToIndex` when nothing is new, changed or removed and the collection's
    indexes and registration are up to date (see :func:`_unfinished_indexing`), and
    :class:`MassDeleteRefused` when the run would delete more than ``max_delete_fraction`` of the
    collection's rows (unless ``allow_mass_delete``), before anything is embedded or written.
    """
    with _connect(settings) as conn:
        ref = _resolve_version(conn, settings).ref
        _check_hash_key(ref, hash_key)
        at_version = versions.version_settings(settings, ref)
        table = at_version.store_table  # created (or brought up to date) by resolve
        source = versions.seed_source(conn, settings.store.schema, settings.store.table, ref["number"])
        seeded = _seed_version(conn, settings, run_key, ref, source, allow_mass_delete)
        lost = store.count_lost_chunks(conn, run_key, table)
        if seeded is None:
            _check_deletions(settings, lost, store.count_vectors(conn, table), allow_mass_delete)
        batches = store.assign_batches(
            conn,
            run_key,
            table,
            settings.embedding.batch_size,
            min(settings.embedding.parallel_tasks, max_batches),
        )
        for batch in batches:
            batch["table"] = table.table
        staged = store.count_staged_chunks(conn, run_key)
        unfinished = None if batches or lost else _unfinished_indexing(conn, settings, ref)
        if seeded is not None and not (batches or lost or unfinished):
            unfinished = (
                f"version {ref['number']} takes the rows of version {source.number if source else '?'}"
            )
    to_embed = sum(batch["chunks"] for batch in batches)
    with _acknowledged_when_nothing_to_index(settings, run_key):
        _say_what_to_do(staged, to_embed, lost, len(batches), unfinished)
    summary: PrepareSummary = {
        "run_key": run_key,
        "staged_chunks": staged,
        "to_embed": to_embed,
        "unchanged": staged - to_embed,
        "to_delete": lost,
        "version": ref,
    }
    if seeded is not None:
        summary["seeded"] = seeded
    return {"summary": summary, "batches": batches}


def _check_hash_key(ref: VersionRef, hash_key: str | None) -> None:
    if hash_key is not None and hash_key != ref["hash_key"]:
        raise store.StagingIncomplete(
            f"the run's chunks were hashed for another version of the collection than version "
            f"{ref['number']}, which it writes to: a switch or rollback happened between its load and "
            "now, or the workers that ran them have different versions of the model's package installed. "
            "Nothing was embedded; re-run the DAG from load_enriched_documents"
        )


def _say_what_to_do(staged: int, to_embed: int, lost: int, batches: int, unfinished: str | None) -> None:
    """Log what the run will do; :class:`NothingToIndex` when there is nothing."""
    log.info(
        "%d of %d staged chunks are new or changed (%d unchanged, skipped); %d stored chunks to remove; "
        "%d embedding batch(es)",
        to_embed,
        staged,
        staged - to_embed,
        lost,
        batches,
    )
    if unfinished:
        log.info(
            "no new or changed chunks, but %s: going on, to build the indexes, validate and publish",
            unfinished,
        )
    elif not batches and not lost:
        raise NothingToIndex(
            f"no new or changed chunks in this run's batches ({staged} chunks, all already indexed "
            "with the same text, metadata and embedding): nothing to do, no new asset event"
        )


def _seed_version(
    conn: psycopg.Connection,
    settings: CollectionSettings,
    run_key: str,
    ref: VersionRef,
    source: versions.Version | None,
    allow_mass_delete: bool,
) -> int | None:
    """Stage the chunks of ``source`` (the live version, for a version being built; the version
    switched away from, for one rolled back to) that the run's documents do not replace; returns how
    many (None when the version needs no seeding). The mass-delete guard counts against ``source``:
    what it holds that the run's documents lost is what the version will not have."""
    if source is None:
        return None
    source_table = versions.version_settings(settings, source.ref).store_table
    lost = store.count_lost_chunks(conn, run_key, source_table)
    _check_deletions(settings, lost, store.count_vectors(conn, source_table), allow_mass_delete)
    schema, stable = settings.store.schema, settings.store.table
    versions.claim_seeding(conn, ref, schema, stable, run_key)
    seeded = store.seed_from(conn, run_key, source_table, ref["hash_key"])
    log.info(
        "version %d takes the rows of version %d (%s): %d of its chunks staged (embedded with %s where they "
        "changed), besides the run's own; rows of version %d that neither has are deleted after the upsert",
        ref["number"],
        source.number,
        source.table,
        seeded,
        settings.embedding.model,
        ref["number"],
    )
    return seeded


def _unfinished_indexing(
    conn: psycopg.Connection, settings: CollectionSettings, version: VersionRef
) -> str | None:
    """Why a run with no changed chunk must still build indexes and validate, or None: the version
    it writes to is not live yet (a new model's version whose validation failed), an index of the
    version is missing or invalid (a table upgraded in place, a failed build, an index dropped by
    hand), or the registry does not describe this version as the spec does: no row for the
    collection's table (a registry of an earlier release, keyed by name and taken by another
    deployment's table), another version, or other search settings (a changed ``search`` section,
    or a run that failed after changing the table)."""
    from capstone import registry
    from capstone.index_build import IndexParams, KeywordIndexParams

    if version["status"] != "live":
        return f"version {version['number']} ({version['table']}) is not live yet"

    at_version = versions.version_settings(settings, version)
    for params in (KeywordIndexParams.of(at_version), IndexParams.of(at_version)):
        if not store.index_is_valid(conn, params.schema, params.index_name):
            return f"index {params.qualified_index()} is missing or invalid"
    registered = registry.registered_row(conn, settings.store.schema, settings.store.table)
    if registered is None:
        return f"the search registry holds no row for {settings.store.schema}.{settings.store.table}"
    if registered.version not in (None, version["number"]):
        return f"the search registry points at version {registered.version}, not the live {version['number']}"
    if registered.search != settings.search:
        return "the collection's search settings changed since its last validation"
    return None


def _check_deletions(settings: CollectionSettings, lost: int, rows: int, allowed: bool) -> None:
    if not rows or lost / rows <= settings.store.max_delete_fraction:
        return
    numbers = (
        f"this run would delete {lost} of the {rows} rows of {settings.store_table.qualified} "
        f"({lost / rows:.0%}: chunks its documents no longer have, and documents deleted upstream), more "
        f"than store.max_delete_fraction ({settings.store.max_delete_fraction:g}) allows"
    )
    if allowed:
        log.warning("%s; going ahead: the run's conf sets allow_mass_delete", numbers)
        return
    raise MassDeleteRefused(
        f"{numbers}, so nothing was written. If the deletions are meant, trigger the DAG with the "
        'conf {"batches": [<the extras of this run\'s asset events>], "allow_mass_delete": true} (or '
        "raise store.max_delete_fraction and clear this run); otherwise fix the upstream batch"
    )


# -- generate_embedding ---------------------------------------------------------------------


def embed_batch(settings: CollectionSettings, run_key: str, batch: BatchDescriptor) -> Manifest:
    """Embed one mapped batch's chunks a step at a time (``embedding.batch_size`` chunks), staging
    each step's vectors as it goes; returns a small manifest.

    A retried task resumes: the chunks an earlier try staged are not embedded again. The model is
    loaded once per task (with its share of the host's cores, see ``embedding.threads``). Chunks
    the embedding API refuses for what they are (an input over the model's token limit, say) are
    left out and listed in ``failed_ids``: their vectors are not staged, so the table keeps what it
    had for them and the next run tries them again. Anything else that fails (rate limits, server
    errors, a wrong key) fails the task, for Airflow to retry. Staging emptied by a crash raises
    :class:`capstone.store.StagingIncomplete`.
    """
    batch_no, total = int(batch["batch_no"]), int(batch["chunks"])
    embedding = settings.embedding
    started = time.monotonic()
    embedder: Embedder | None = None
    failed: list[str] = []
    with _connect(settings) as conn:
        earlier = done = store.count_batch_staged(conn, run_key, batch_no)
        if earlier:
            log.info("batch %d: %d of %d chunks were staged by an earlier try", batch_no, earlier, total)
        table = settings.store_table
        if "table" in batch:  # the version the run writes to
            table = dataclasses.replace(table, table=batch["table"])
        for ids, texts in store.pending_batch_texts(conn, run_key, table, batch_no, _step_size(settings)):
            if embedder is None:
                embedder = _task_embedder(settings, int(batch.get("tasks", 1)))
            kept, vectors, refused = _embed_leaving_out_rejected(embedder, ids, texts)
            if vectors.shape != (len(kept), embedding.dimension):
                raise store.DimensionMismatch(
                    f"the {embedding.provider} model {embedding.model!r} returned vectors of shape "
                    f"{vectors.shape}, expected ({len(kept)}, {embedding.dimension}): fix embedding.dimension"
                )
            store.write_batch_vectors(conn, run_key, kept, vectors)
            done, failed = done + len(ids), failed + refused
            _log_embedding_progress(batch_no, done, total, done - earlier, time.monotonic() - started)
        embedded = store.record_batch_embedded(conn, run_key, batch_no)
    seconds = time.monotonic() - started
    log.info(
        "batch %d: %d chunks embedded in %.2fs (%.0f chunks/s), %d staged in all%s",
        batch_no,
        embedded - earlier,
        seconds,
        (embedded - earlier) / max(seconds, 1e-9),
        embedded,
        f", {len(failed)} refused by the API" if failed else "",
    )
    return {
        "batch_no": batch_no,
        "embedded": embedded,
        "failed": len(failed),
        "failed_ids": failed[:MAX_LISTED],
        "seconds": round(seconds, 3),
    }


# sentence-transformers sorts one call's texts by length before cutting them into forward passes:
# a call of many passes pads less (measured: 64-chunk steps cost ~10% more than 512-chunk ones).
LOCAL_MODEL_PASSES_PER_STEP = 16


def _step_size(settings: CollectionSettings) -> int:
    """Chunks embedded and staged at a time: ``batch_size``, but at least what keeps the provider
    efficient: ``max_concurrent_requests`` full requests for an API (they go out at once), and
    ``LOCAL_MODEL_PASSES_PER_STEP`` forward passes for a local model."""
    embedding = settings.embedding
    if embedding.provider == "openai":
        return max(embedding.batch_size, embedding.request_batch_size * embedding.max_concurrent_requests)
    if embedding.provider == "sentence-transformers":
        return max(embedding.batch_size, embedding.request_batch_size * LOCAL_MODEL_PASSES_PER_STEP)
    return embedding.batch_size


def _task_embedder(settings: CollectionSettings, tasks: int) -> Embedder:
    """The embedder of one of ``tasks`` mapped tasks: a local model gets the task's share of the
    host's cores (the run's tasks that run at once share them)."""
    from capstone.embeddings import embedder_for

    embedding = settings.embedding
    threads = None
    if embedding.provider == "sentence-transformers":
        from capstone.embeddings.local_model import threads_per_task

        threads = threads_per_task(embedding.threads, min(tasks, embedding.concurrent_tasks))
    return embedder_for(embedding, threads=threads)


def _log_embedding_progress(batch_no: int, done: int, total: int, this_try: int, seconds: float) -> None:
    rate = this_try / max(seconds, 1e-9)
    left = max(total - done, 0)
    log.info(
        "batch %d: %d/%d chunks embedded (%.0f%%), %.0f chunks/s, about %.0fs left",
        batch_no,
        done,
        total,
        100 * done / max(total, 1),
        rate,
        left / max(rate, 1e-9),
    )


# A text any embedding API accepts: when even this is refused, the request is wrong, not the inputs.
_PROBE_TEXT = "probe"


def _embed_leaving_out_rejected(
    embedder: Embedder, ids: list[str], texts: list[str]
) -> tuple[list[str], np.ndarray, list[str]]:
    """(ids embedded, their vectors, ids the API refused); bisects a refused request to find them.

    Raises the refusal when the API refuses a one-word probe too (a wrong model name, say): then
    no input is at fault and the task must fail. Finding r refused chunks among n costs about
    ``2 r log2(n)`` extra requests, on this rare path only.
    """
    from capstone.embeddings import EmbeddingInputRejected

    try:
        return ids, embedder.embed(texts), []
    except EmbeddingInputRejected as refused:
        try:
            embedder.embed([_PROBE_TEXT])
        except EmbeddingInputRejected:
            raise refused from None
        log.warning("%s; looking for the inputs at fault", refused)
    kept: list[str] = []
    vectors: list[np.ndarray] = []
    failed: list[str] = []

    def embed_range(first: int, stop: int) -> None:
        try:
            vectors.append(embedder.embed(texts[first:stop]))
            kept.extend(ids[first:stop])
        except EmbeddingInputRejected as exc:
            if stop - first == 1:
                log.warning("chunk %s refused by the embedding API: %s", ids[first], exc)
                failed.append(ids[first])
                return
            middle = (first + stop) // 2
            embed_range(first, middle)
            embed_range(middle, stop)

    middle = len(texts) // 2
    embed_range(0, middle)
    embed_range(middle, len(texts))
    return kept, np.concatenate(vectors) if vectors else embedder.embed([]), failed


# -- aggregate_embeddings -------------------------------------------------------------------


def aggregate_manifests(prepared: PrepareSummary, manifests: Iterable[Manifest | None]) -> EmbeddingTotals:
    """Totals over the mapped embedding tasks: embedded chunks and failed chunk ids."""
    results = [manifest for manifest in manifests if manifest]
    embedded = sum(manifest["embedded"] for manifest in results)
    failed = [chunk for manifest in results for chunk in manifest["failed_ids"]]
    failed_count = sum(manifest["failed"] for manifest in results)
    seconds = sum(manifest["seconds"] for manifest in results)
    if embedded + failed_count < prepared["to_embed"]:
        raise store.StagingIncomplete(
            f"{prepared['to_embed']} chunks were to be embedded, but the embedding tasks staged "
            f"{embedded} and the API refused {failed_count} (did Postgres crash? it empties unlogged "
            "staging tables): nothing was merged; re-run the DAG from load_enriched_documents"
        )
    log.info(
        "embeddings: %d chunks in %d batch(es), %d failed, %.1fs of embedding time",
        embedded,
        len(results),
        failed_count,
        seconds,
    )
    if failed_count:
        log.warning(
            "%d chunks refused by the embedding API are not indexed (the table keeps what it had for "
            "them; the next run tries them again): %s",
            failed_count,
            failed[:MAX_LISTED],
        )
    totals: EmbeddingTotals = {
        "run_key": prepared["run_key"],
        "batches": len(results),
        "embedded": embedded,
        "expected": prepared["to_embed"],
        "failed_count": failed_count,
        "failed_ids": failed[:MAX_LISTED],
        "to_delete": prepared["to_delete"],
    }
    if "version" in prepared:
        totals["version"] = prepared["version"]
    if "seeded" in prepared:
        totals["seeded"] = prepared["seeded"]
    return totals


# -- batch_upsert_vectors -------------------------------------------------------------------


def upsert_vectors(settings: CollectionSettings, aggregate: EmbeddingTotals) -> UpsertResult:
    """Merge the run's staged vectors into the table in transactions of ``upsert_batch_size``,
    ``upsert_parallelism`` transactions at a time.

    A failing batch rolls back alone and the others go on; the task then fails so that its retry
    redoes what is missing (the merge is an upsert, so redoing a batch changes nothing). Chunks
    that re-indexed documents no longer have are deleted, and the run's staging tables dropped,
    only once every batch is in; then the changes of a followed table that the run read leave its
    capture queue (:func:`capstone.table_source.acknowledge`).
    """
    run_key = str(aggregate["run_key"])
    with _connect(settings) as conn:
        ref = _version_of(conn, settings, aggregate.get("version"))
        versions.check_embedding_unchanged(settings, ref)
        at_version = versions.version_settings(settings, ref)
        table = at_version.store_table
        store.ensure_collection_table(conn, table)
        _check_staging_complete(store.count_staged_vectors(conn, run_key), aggregate)
        spans = store.merge_spans(conn, run_key, settings.upsert_batch_size)
        upserted, failures, terminal = _merge_spans(conn, at_version, run_key, spans)
        if failures:
            summary = f"{len(failures)} of {len(spans)} upsert batches failed and were rolled back"
            if terminal:  # e.g. permission denied on the table: the same would happen on every retry
                raise MergeRefused(f"{summary} ({'; '.join(failures[:3])}); fix that first, then re-run")
            raise RuntimeError(f"{summary} ({'; '.join(failures[:3])}); the retry will redo them")
        deleted = store.delete_lost_chunks(conn, run_key, table)
        if "seeded" in aggregate:  # the version now holds its source's chunks and the run's
            deleted += store.delete_unstaged(conn, run_key, table)
            if aggregate["failed_count"]:
                log.warning(
                    "version %d lacks %d chunks the embedding API refused: it is not switched to, and the "
                    "next run stages its source's rows again (only what is missing is embedded)",
                    ref["number"],
                    aggregate["failed_count"],
                )
            else:
                versions.mark_seeded(conn, ref, settings.store.schema, settings.store.table)
                ref = {**ref, "seeded": True}
        store.drop_run_staging(conn, run_key)
        total = store.count_vectors(conn, table)
    _acknowledge_table_changes(settings, run_key)
    log.info(
        "upserted %d rows, deleted %d lost chunks; %s now holds %d vectors",
        upserted,
        deleted,
        table.qualified,
        total,
    )
    return {
        "run_key": run_key,
        "upserted": upserted,
        "failed": 0,
        "deleted": deleted,
        "batches": len(spans),
        "expected_count": total,
        "version": ref,
        "table": table.table,
    }


def _check_staging_complete(staged: int, aggregate: EmbeddingTotals) -> None:
    if staged != int(aggregate["embedded"]):
        raise store.StagingIncomplete(
            f"{aggregate['embedded']} vectors were embedded but {staged} are in staging (did Postgres "
            "crash? it empties unlogged staging tables): nothing was merged; re-run the DAG and the "
            "missing chunks are embedded again"
        )


def _merge_spans(
    conn: psycopg.Connection, settings: CollectionSettings, run_key: str, spans: list[tuple[str, str, int]]
) -> tuple[int, list[str], bool]:
    """Merge every span, ``settings.upsert_parallelism`` at a time; (rows upserted, failure notes,
    whether a failure is terminal).

    Each span is its own transaction on one of the connections (``conn`` and the extra ones
    opened here): a failing span rolls back alone while the others go on. An error that no other
    span can survive (the database gone, staging emptied) stops every connection after its
    current span and is raised.
    """
    progress = _MergeProgress(spans)
    extra = max(0, min(settings.upsert_parallelism, len(spans)) - 1)
    if not extra:
        _merge_worker(conn, settings, run_key, progress)
        return progress.upserted, progress.failures, progress.terminal
    with ThreadPoolExecutor(max_workers=extra, thread_name_prefix="upsert") as pool:
        helpers = [pool.submit(_merge_on_own_connection, settings, run_key, progress) for _ in range(extra)]
        try:
            _merge_worker(conn, settings, run_key, progress)
        except BaseException:
            progress.stop()
            raise
    for helper in helpers:
        helper.result()  # re-raises a helper's fatal error
    return progress.upserted, progress.failures, progress.terminal


class _MergeProgress:
    """Hands the spans out to the merging connections, in id order, and logs how each one went."""

    def __init__(self, spans: list[tuple[str, str, int]]) -> None:
        self._spans = spans
        self._next = 0
        self._stopped = False
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.upserted = 0
        self.finished = 0
        self.failures: list[str] = []
        self.terminal = False  # a failure no retry can fix (see capstone.errors.is_terminal)

    def take(self) -> tuple[int, tuple[str, str, int]] | None:
        """The next span to merge and its 1-based number, or None when all are taken or stopped."""
        with self._lock:
            if self._stopped or self._next >= len(self._spans):
                return None
            self._next += 1
            return self._next, self._spans[self._next - 1]

    def stop(self) -> None:
        with self._lock:
            self._stopped = True

    def merged(self, number: int, rows: int) -> None:
        with self._lock:
            self.upserted += rows
            self.finished += 1
            upserted, left = self.upserted, len(self._spans) - self.finished
        elapsed = time.monotonic() - self._started
        log.info(
            "upsert batch %d/%d: %d rows (%d so far, %.0f rows/s, %d batches left)",
            number,
            len(self._spans),
            rows,
            upserted,
            upserted / max(elapsed, 1e-9),
            left,
        )

    def failed(self, number: int, exc: psycopg.Error) -> None:
        with self._lock:
            self.failures.append(f"batch {number}: {exc.diag.message_primary or exc}")
            self.terminal = self.terminal or is_terminal(exc)
            self.finished += 1
        log.error("upsert batch %d/%d failed and was rolled back: %s", number, len(self._spans), exc)


def _merge_worker(
    conn: psycopg.Connection, settings: CollectionSettings, run_key: str, progress: _MergeProgress
) -> None:
    while (taken := progress.take()) is not None:
        number, (first_id, last_id, expected) = taken
        try:
            count = store.merge_batch(
                conn, run_key, settings.store_table, settings.embedding.model, first_id, last_id, expected
            )
        except (psycopg.OperationalError, store.StagingIncomplete):
            progress.stop()  # the database or the staging is gone: no other batch can succeed
            raise
        except psycopg.Error as exc:
            progress.failed(number, exc)
        else:
            progress.merged(number, count)


def _merge_on_own_connection(settings: CollectionSettings, run_key: str, progress: _MergeProgress) -> None:
    try:
        conn = _connect(settings)
    except psycopg.OperationalError as exc:
        # Say, max_connections reached: the other connections merge what this one would have.
        log.warning("could not open an extra upsert connection (%s); merging on fewer", exc)
        return
    with conn:
        _merge_worker(conn, settings, run_key, progress)

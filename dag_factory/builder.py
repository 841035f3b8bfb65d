"""Turn one :class:`CollectionSpec` into one Asset-scheduled Airflow DAG.

One small function per task; the task bodies live in :mod:`capstone.pipeline` and
:mod:`capstone.validation`, which know nothing of YAML or of this module.

    Asset(<source>) [| Asset(<collection>.table_changes), watched by TableChangesTrigger,
                       or by TablePollTrigger for a table followed by its updated_at column]
      -> load_enriched_documents -> prepare_chunks
      -> generate_embedding.expand(batch=...)   (pool, retries, exponential backoff)
      -> aggregate_embeddings -> batch_upsert_vectors -> wait_for_indexing (deferrable)
      -> validate_index_health -> publish_indexed_asset (outlet Asset(<collection>.indexed))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from airflow.sdk import DAG, Asset, get_current_context, task

from capstone.contracts import (
    BatchDescriptor,
    EmbeddingTotals,
    IndexedEvent,
    IndexEvent,
    LoadResult,
    Manifest,
    PrepareSummary,
    UpsertResult,
    ValidationReport,
)
from capstone.settings import CollectionSettings
from dag_factory.runtime import collection_settings
from dag_factory.spec import CollectionSpec

__all__ = ["TASK_IDS", "build_collection_dag", "table_changes_asset"]

# The tasks of every collection's DAG, in pipeline order.
TASK_IDS = (
    "load_enriched_documents",
    "prepare_chunks",
    "generate_embedding",
    "aggregate_embeddings",
    "batch_upsert_vectors",
    "wait_for_indexing",
    "validate_index_health",
    "publish_indexed_asset",
)

log = logging.getLogger(__name__)


def build_collection_dag(spec: CollectionSpec, source_file: Path) -> DAG:
    """Build the collection's DAG; ``source_file`` is the YAML it came from (shown in the docs)."""
    settings = collection_settings(spec)
    output = Asset(spec.output_asset_name)
    default_args: dict[str, Any] = {
        "owner": spec.dag.owner,
        "retries": spec.dag.retries,
        "retry_delay": timedelta(seconds=spec.dag.retry_delay_seconds),
        **spec.dag.default_args,
    }
    with DAG(
        dag_id=spec.collection,
        description=spec.description or f"Index {spec.source_asset} into {settings.store_table.qualified}",
        schedule=_schedule(spec, settings),
        catchup=False,
        max_active_runs=spec.dag.max_active_runs,
        tags=sorted({*spec.dag.tags, "capstone"}),
        default_args=default_args,
        doc_md=_doc(spec, source_file),
        # collection_dags.py registers the DAGs it returns; collection_config_errors.py must not.
        auto_register=False,
    ) as dag:
        loaded = _load_task(settings)()
        batches = _prepare_task(settings)(loaded)
        prepared = batches["summary"]
        manifests = _embed_task(spec, settings).expand(batch=batches)
        aggregated = _aggregate_task()(prepared, manifests)
        upserted = _upsert_task(settings)(aggregated)
        indexed = _wait_task(settings, upserted)
        report = _validate_task(settings)(upserted, indexed.output)
        _publish_task(spec, output)(loaded, prepared, aggregated, upserted, indexed.output, report)
    return dag


def _schedule(spec: CollectionSpec, settings: CollectionSettings) -> Any:
    """The upstream asset; or'd, for a collection that follows a table, with an asset whose
    ``AssetWatcher`` fires when the table changed (``<collection>.table_changes``)."""
    upstream = Asset(spec.source_asset)
    followed = settings.source.table
    if followed is None:
        return upstream
    from airflow.sdk import AssetWatcher

    from capstone.table_watch import capture_fingerprint
    from capstone.triggers import TableChangesTrigger, TablePollTrigger

    trigger: TableChangesTrigger | TablePollTrigger
    if followed.updated_at_column is None:
        trigger = TableChangesTrigger(
            collection=spec.collection,
            connection_id=followed.connection_id,
            capture=capture_fingerprint(followed),
        )
    else:  # no triggers on the table: its updated_at and row count, polled
        trigger = TablePollTrigger(
            collection=spec.collection,
            connection_id=followed.connection_id,
            store_connection_id=settings.store.connection_id,
            table=followed.qualified,
            updated_at_column=followed.updated_at_column,
            capture=capture_fingerprint(followed),
            poll_seconds=followed.poll_seconds,
            refire_after=max(60.0, 2 * followed.poll_seconds),
        )
    watcher = AssetWatcher(name=f"{spec.collection}_table_changes", trigger=trigger)
    return upstream | Asset(table_changes_asset(spec.collection), watchers=[watcher])


def table_changes_asset(collection: str) -> str:
    """The asset a followed table's changes are events of."""
    return f"{collection}.table_changes"


def _doc(spec: CollectionSpec, source_file: Path) -> str:
    return (
        f"Generated from `{source_file.name}` by dag_factory.\n\n"
        f"Indexes events of `{spec.source_asset}` into `{spec.store.schema_name}.{spec.table_name}` "
        f"({spec.embedding.provider} `{spec.embedding.model_name}`, {spec.index.type} "
        f"{spec.index.metric}) and publishes `{spec.output_asset_name}`."
    )


def _run_key() -> str:
    from capstone.pipeline import run_key_for

    context = get_current_context()
    return run_key_for(context["dag"].dag_id, context["run_id"])


def _batch_locations(settings: CollectionSettings) -> list[Any]:
    """Batches named by the triggering asset events (newest first), a manual run's conf, or the default
    (none for a collection that follows a table: the run reads the table's changes)."""
    from capstone.documents import BatchLocation

    context = get_current_context()
    changes = table_changes_asset(settings.collection)  # its events name no batch: the run reads the table
    events = [
        event
        for group in context["triggering_asset_events"].values()
        for event in group
        if event.asset.name != changes
    ]
    events.sort(key=lambda event: event.timestamp, reverse=True)
    extras: list[dict[str, Any]] = [dict(event.extra or {}) for event in events]
    conf = context["dag_run"].conf or {}
    extras += list(conf.get("batches", []))
    if not extras and settings.source.default_location and settings.source.table is None:
        extras.append({"format": "jsonl", "path": settings.source.default_location})
    return [BatchLocation.from_extra(extra) for extra in extras]


@contextmanager
def _terminal_errors_fail_at_once() -> Iterator[None]:
    """Fail the task on this try, with the error's own message, when retrying cannot help
    (:func:`capstone.errors.is_terminal`); transient errors go on to the task's retries."""
    try:
        yield
    except Exception as exc:
        from capstone.errors import is_terminal

        if not is_terminal(exc):
            raise
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(exc)) from exc


def _allow_mass_delete() -> bool:
    conf = get_current_context()["dag_run"].conf or {}
    return conf.get("allow_mass_delete") is True


def _load_task(settings: CollectionSettings) -> Any:
    @task(task_id="load_enriched_documents", multiple_outputs=True)
    def load_enriched_documents() -> LoadResult:
        """Read the batches the triggering asset events name; set bad documents aside."""
        from capstone.pipeline import load_documents

        with _terminal_errors_fail_at_once():
            return load_documents(settings, _run_key(), _batch_locations(settings))

    return load_enriched_documents


def _prepare_task(settings: CollectionSettings) -> Any:
    @task(task_id="prepare_chunks")
    def prepare_chunks(loaded: LoadResult) -> list[BatchDescriptor]:
        """Hash chunks, skip unchanged ones, cut the rest into batches for mapping.

        Returns the batch descriptors (mapped over); the counts go to the ``summary`` XCom.
        """
        from airflow.configuration import conf

        from capstone.pipeline import NothingToIndex, prepare_chunks

        try:
            with _terminal_errors_fail_at_once():
                prepared = prepare_chunks(
                    settings,
                    loaded["run_key"],
                    conf.getint("core", "max_map_length"),
                    allow_mass_delete=_allow_mass_delete(),
                    hash_key=loaded.get("hash_key"),
                )
        except NothingToIndex as reason:
            log.info("%s", reason)
            _skip_the_rest_of_the_run()
        get_current_context()["ti"].xcom_push(key="summary", value=prepared["summary"])
        return prepared["batches"]

    return prepare_chunks


def _skip_the_rest_of_the_run() -> NoReturn:
    """Mark every task after the running one skipped at once, and end it successfully.

    Raising ``AirflowSkipException`` would skip only this task, and the scheduler would then skip
    the tasks after it one level per loop (~1 s each: 4 s of a 7 s run with nothing to index). The
    skip is recorded where Airflow looks for it, so a cleared downstream task is skipped again.
    """
    from airflow.sdk.bases.skipmixin import SkipMixin

    context = get_current_context()
    SkipMixin().skip(context["ti"], context["task"].get_flat_relatives(upstream=False))
    raise AssertionError("SkipMixin.skip raises DownstreamTasksSkipped for an unmapped task")


def _embed_task(spec: CollectionSpec, settings: CollectionSettings) -> Any:
    embedding = spec.embedding

    @task(
        task_id="generate_embedding",
        pool=embedding.pool,
        retries=embedding.retries,
        retry_delay=timedelta(seconds=embedding.retry_delay_seconds),
        retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(seconds=embedding.max_retry_delay_seconds),
        map_index_template="batch {{ task.op_kwargs['batch']['batch_no'] }}",
        multiple_outputs=True,
    )
    def generate_embedding(batch: BatchDescriptor) -> Manifest:
        """Embed this task's share of the run's chunks, ``embedding.batch_size`` at a time, and
        stage the vectors in Postgres as it goes (a retry resumes where the failed try stopped)."""
        from capstone.pipeline import embed_batch

        with _terminal_errors_fail_at_once():
            return embed_batch(settings, _run_key(), batch)

    return generate_embedding


def _aggregate_task() -> Any:
    # Runs when embedding was skipped because a re-indexed document only lost chunks.
    @task(task_id="aggregate_embeddings", trigger_rule="none_failed_min_one_success", multiple_outputs=True)
    def aggregate_embeddings(prepared: PrepareSummary, manifests: Any) -> EmbeddingTotals:
        """Totals and failed chunk ids over all embedding batches."""
        from capstone.pipeline import aggregate_manifests

        with _terminal_errors_fail_at_once():
            return aggregate_manifests(prepared, manifests[:] if manifests is not None else [])

    return aggregate_embeddings


def _upsert_task(settings: CollectionSettings) -> Any:
    @task(task_id="batch_upsert_vectors", multiple_outputs=True)
    def batch_upsert_vectors(aggregated: EmbeddingTotals) -> UpsertResult:
        """Merge staged vectors into the collection table, batch by batch."""
        from capstone.pipeline import upsert_vectors

        with _terminal_errors_fail_at_once():
            return upsert_vectors(settings, aggregated)

    return batch_upsert_vectors


def _wait_task(settings: CollectionSettings, upserted: Any) -> Any:
    from capstone.index_build import IndexParams, KeywordIndexParams
    from capstone.sensors import VectorStoreIndexingSensor

    return VectorStoreIndexingSensor(
        task_id="wait_for_indexing",
        collection_name=settings.collection,
        expected_count=upserted["expected_count"],
        index=IndexParams.of(settings),
        keyword_index=KeywordIndexParams.of(settings),
        table=upserted["table"],  # the version of the collection the run wrote to
        connection_id=settings.store.connection_id,
        poll_interval=settings.index.poll_interval_seconds,
        timeout=settings.index.build_timeout_seconds,
        deferrable=True,
        in_worker_max_rows=settings.index.in_worker_max_rows,
    )


def _validate_task(settings: CollectionSettings) -> Any:
    @task(task_id="validate_index_health", multiple_outputs=True)
    def validate_index_health(upserted: UpsertResult, indexed: IndexEvent) -> ValidationReport:
        """Counts, sample queries, recall vs exact search, freshness; fails on the spec's fail_on checks."""
        from capstone.validation import validate_collection

        with _terminal_errors_fail_at_once():
            return validate_collection(settings, upserted, indexed)

    return validate_index_health


def _publish_task(spec: CollectionSpec, output: Asset) -> Any:
    @task(task_id="publish_indexed_asset", outlets=[output], multiple_outputs=True)
    def publish_indexed_asset(
        loaded: LoadResult,
        prepared: PrepareSummary,
        aggregated: EmbeddingTotals,
        upserted: UpsertResult,
        indexed: IndexEvent,
        report: ValidationReport,
    ) -> IndexedEvent:
        """Publish the collection's indexed asset with a summary of the run in the event extra."""
        context = get_current_context()
        summary: IndexedEvent = {
            "collection": spec.collection,
            "run_id": context["run_id"],
            "model": spec.embedding.model_name,
            "provider": spec.embedding.provider,
            "sources": loaded["sources"],
            "documents": loaded["documents"],
            "rejected_documents": loaded["rejected_count"],
            "deleted_documents": loaded["deleted_documents"],
            "chunks_embedded": aggregated["embedded"],
            "chunks_failed": aggregated["failed_count"],
            "failed_chunk_ids": aggregated["failed_ids"],
            "chunks_unchanged": prepared["unchanged"],
            "rows_upserted": upserted["upserted"],
            "rows_deleted": upserted["deleted"],
            "vector_count": upserted["expected_count"],
            "index_name": indexed.get("index_name"),
            "index_size_bytes": indexed.get("index_size_bytes"),
            "validation": report["summary"],
            "table": f"{spec.store.schema_name}.{spec.table_name}",
            "connection_id": spec.store.connection_id,
            "version": report["summary"].get("version"),
            "live_version": report["summary"].get("live_version"),
            "switched": bool(report["summary"].get("switched")),
        }
        context["outlet_events"][output].extra = dict[str, Any](summary)
        log.info("publishing %s: %s", output.name, summary)
        return summary

    return publish_indexed_asset

"""How a validated spec becomes the typed settings ``capstone`` runs on: one function, one place.

Every default and bound lives in :mod:`dag_factory.spec`; this only resolves what the spec leaves
implicit (the provider's default model and dimension, the table's default name, normalisation
from the metric, what chunk sizes count) and copies each section into its frozen
:mod:`capstone.settings` twin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from capstone.settings import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_CHUNK_TOKENS,
    ChunkingSettings,
    CollectionSettings,
    EmbeddingSettings,
    IndexSettings,
    SampleQuery,
    SearchSettings,
    SourceSettings,
    StoreSettings,
    TableSourceSettings,
    ValidationSettings,
)
from dag_factory.spec import CollectionSpec

__all__ = ["collection_settings", "settings_from_mapping"]


def settings_from_mapping(raw: Mapping[str, Any]) -> CollectionSettings:
    """The settings of a collection given as the mapping its YAML file would hold (validated by the
    spec, defaults and all): for code that builds collections without a file, such as benchmarks."""
    return collection_settings(CollectionSpec.model_validate(raw))


def collection_settings(spec: CollectionSpec) -> CollectionSettings:
    """The settings every task of the collection's DAG receives."""
    embedding, store, index, validation = spec.embedding, spec.store, spec.index, spec.validation
    return CollectionSettings(
        collection=spec.collection,
        source=SourceSettings(
            default_location=spec.source.default_location,
            max_rejected_fraction=spec.source.max_rejected_fraction,
            table=_table_source(spec),
        ),
        chunking=_chunking(spec),
        embedding=EmbeddingSettings(
            provider=embedding.provider,
            model=embedding.model_name,
            dimension=embedding.vector_dimension,
            normalize=index.metric in ("cosine", "inner_product"),
            batch_size=embedding.batch_size,
            parallel_tasks=embedding.parallel_tasks or embedding.pool_slots,
            pool_slots=embedding.pool_slots,
            request_batch_size=embedding.request_batch_size,
            device=embedding.device,
            threads=embedding.threads,
            backend=embedding.backend,
            base_url=embedding.base_url,
            connection_id=embedding.connection_id,
            api_key_env=embedding.api_key_env,
            request_timeout_seconds=embedding.request_timeout_seconds,
            max_concurrent_requests=embedding.max_concurrent_requests,
            max_tokens_per_request=embedding.max_tokens_per_request,
        ),
        store=StoreSettings(
            connection_id=store.connection_id,
            schema=store.schema_name,
            table=spec.table_name,
            max_delete_fraction=store.max_delete_fraction,
            vector_type=spec.vector_type,
            keep_versions=store.keep_versions,
        ),
        index=IndexSettings(**index.model_dump()),
        upsert_batch_size=spec.upsert_batch_size,
        upsert_parallelism=spec.upsert_parallelism,
        validation=ValidationSettings(
            sample_queries=tuple(SampleQuery(**query.model_dump()) for query in validation.sample_queries),
            top_k=validation.top_k,
            recall_k=validation.recall_k,
            recall_sample_size=validation.recall_sample_size,
            recall_threshold=validation.recall_threshold,
            freshness_limit_seconds=validation.freshness_limit_seconds,
            fail_on=tuple(validation.fail_on),
            query_checks=validation.query_checks,
            query_checks_every=validation.query_checks_every,
            query_checks_changed_fraction=validation.query_checks_changed_fraction,
        ),
        search=SearchSettings(**spec.search.model_dump()),
    )


def _chunking(spec: CollectionSpec) -> ChunkingSettings:
    """``chunking`` with ``unit: auto`` and the default ``size`` resolved: tokens of the embedding
    model, characters for the ``hash`` provider (it has no tokenizer)."""
    chunking = spec.chunking
    unit: Literal["tokens", "characters"]
    if chunking.unit == "auto":
        unit = "characters" if spec.embedding.provider == "hash" else "tokens"
    else:
        unit = chunking.unit
    default_size = DEFAULT_CHUNK_TOKENS if unit == "tokens" else DEFAULT_CHUNK_CHARS
    return ChunkingSettings(
        size=chunking.size or default_size,
        overlap=chunking.overlap,
        unit=unit,
        format=chunking.format,
        max_chunk_chars=chunking.max_chunk_chars,
        max_chunks_per_document=chunking.max_chunks_per_document,
    )


def _table_source(spec: CollectionSpec) -> TableSourceSettings | None:
    followed = spec.source.table
    if followed is None:
        return None
    schema, table = followed.schema_and_table
    return TableSourceSettings(
        schema=schema,
        table=table,
        id_column=followed.id,
        content_column=followed.content,
        metadata_columns=tuple(followed.metadata),
        connection_id=followed.connection_id or spec.store.connection_id,
        updated_at_column=followed.updated_at,
        lookback_seconds=followed.lookback_seconds,
        poll_seconds=followed.poll_seconds,
    )

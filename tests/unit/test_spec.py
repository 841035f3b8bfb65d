"""The collection spec: defaults that work out of the box, and rules that refuse unsafe values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dag_factory.errors import InvalidField
from dag_factory.loader import load_collection
from dag_factory.spec import (
    MAX_INDEXED_DIMENSION,
    CollectionSpec,
    EmbeddingSpec,
    IndexSpec,
    SearchSpec,
    StoreSpec,
)

MINIMAL_YAML = """\
# The smallest useful collection file: a name and an embedding provider.
# Everything else has a default that works on the embedded Postgres.
collection: faq
embedding:
  provider: hash
"""


@pytest.fixture
def minimal(tmp_path: Path) -> CollectionSpec:
    path = tmp_path / "faq.yaml"
    path.write_text(MINIMAL_YAML, encoding="utf-8")
    return load_collection(path)


def test_minimal_file_derives_assets_and_table_from_the_name(minimal: CollectionSpec) -> None:
    assert minimal.source_asset == "faq.enriched"
    assert minimal.output_asset_name == "faq.indexed"
    assert (minimal.store.schema_name, minimal.table_name) == ("public", "faq")


def test_minimal_file_gets_a_cosine_hnsw_index(minimal: CollectionSpec) -> None:
    index = minimal.index
    assert (index.type, index.metric, index.m, index.ef_construction) == ("hnsw", "cosine", 16, 64)
    assert index.lists is None


def test_minimal_file_embeds_in_the_embedding_pool(minimal: CollectionSpec) -> None:
    embedding = minimal.embedding
    assert (embedding.pool, embedding.model_name, embedding.vector_dimension) == ("embedding", "hash-v1", 384)
    assert minimal.store.connection_id == "vector_store_default"
    assert minimal.validation.fail_on == ["vector_count"]


@pytest.mark.parametrize(
    ("provider", "model", "dimension"),
    [
        ("hash", "hash-v1", 384),
        ("sentence-transformers", "all-MiniLM-L6-v2", 384),
        ("openai", "text-embedding-3-small", 1536),
    ],
)
def test_each_provider_has_a_default_model_and_dimension(provider: str, model: str, dimension: int) -> None:
    embedding = EmbeddingSpec.model_validate({"provider": provider})
    assert (embedding.model_name, embedding.vector_dimension) == (model, dimension)


def test_explicit_names_win_over_derived_ones() -> None:
    spec = CollectionSpec.model_validate(
        {
            "collection": "faq",
            "source": {"asset": "support.faq.enriched"},
            "output_asset": "support.faq.indexed",
            "store": {"schema": "search", "table": "faq_chunks"},
        }
    )
    assert (spec.source_asset, spec.output_asset_name) == ("support.faq.enriched", "support.faq.indexed")
    assert (spec.store.schema_name, spec.table_name) == ("search", "faq_chunks")


def test_schema_accepts_its_alias_and_its_name() -> None:
    assert StoreSpec.model_validate({"schema": "a"}).schema_name == "a"
    assert StoreSpec.model_validate({"schema_name": "b"}).schema_name == "b"


@pytest.mark.parametrize(
    "table",
    ['faq"x', "faq;drop", "faq docs", "Faq", "1faq", "a" * 64, "fäq", ""],
)
def test_unsafe_table_names_are_refused(table: str) -> None:
    with pytest.raises(ValidationError):
        StoreSpec.model_validate({"table": table})


def test_longest_allowed_identifier_is_63_bytes() -> None:
    assert StoreSpec.model_validate({"table": "a" * 63}).table == "a" * 63


def test_dimension_limit_is_pgvectors_index_limit() -> None:
    assert EmbeddingSpec(model="m", dimension=4000).vector_dimension == 4000
    with pytest.raises(ValidationError, match=r"index limit of 4000 \(halfvec; 2000 for vector\)"):
        EmbeddingSpec(model="m", dimension=4001)


@pytest.mark.parametrize(
    ("dimension", "vector_type", "resolved"),
    [
        (MAX_INDEXED_DIMENSION, "auto", "vector"),
        (MAX_INDEXED_DIMENSION + 1, "auto", "halfvec"),
        (384, "halfvec", "halfvec"),
    ],
)
def test_vector_type_auto_is_halfvec_above_the_vector_index_limit(
    dimension: int, vector_type: str, resolved: str
) -> None:
    spec = CollectionSpec.model_validate(
        {
            "collection": "faq",
            "embedding": {"provider": "openai", "model": "m", "dimension": dimension},
            "store": {"vector_type": vector_type},
        }
    )
    assert spec.vector_type == resolved


def test_a_vector_column_above_its_index_limit_names_the_setting_and_the_fix() -> None:
    with pytest.raises(ValidationError, match=r"store.vector_type.*use 'halfvec'"):
        CollectionSpec.model_validate(
            {
                "collection": "faq",
                "embedding": {"provider": "openai", "model": "text-embedding-3-large", "dimension": 3072},
                "store": {"vector_type": "vector"},
            }
        )


def test_ivfflat_accepts_probes_up_to_lists() -> None:
    index = IndexSpec(type="ivfflat", lists=10, probes=10)
    assert (index.lists, index.probes) == (10, 10)


def test_cross_field_errors_name_the_field_to_change() -> None:
    with pytest.raises(ValidationError) as raised:
        IndexSpec(m=32, ef_construction=40)
    (error,) = raised.value.errors()
    cause = error["ctx"]["error"]
    assert isinstance(cause, InvalidField)
    assert (cause.field, cause.message) == ("ef_construction", "must be at least 2 * m = 64, got 40")
    assert "ef_construction: must be at least" in str(raised.value)


def test_output_asset_equal_to_default_source_is_refused() -> None:
    with pytest.raises(ValidationError, match="trigger itself"):
        CollectionSpec.model_validate({"collection": "faq", "output_asset": "faq.enriched"})


def test_unknown_keys_are_refused_at_every_level() -> None:
    for data in ({"collection": "faq", "colour": 1}, {"collection": "faq", "index": {"colour": 1}}):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            CollectionSpec.model_validate(data)


def test_embedding_tasks_default_to_the_pools_slots(minimal: CollectionSpec) -> None:
    from dag_factory.runtime import collection_settings

    embedding = collection_settings(minimal).embedding
    assert (embedding.parallel_tasks, embedding.concurrent_tasks) == (2, 2)
    assert (embedding.device, embedding.threads, embedding.max_concurrent_requests) == ("auto", None, 4)
    assert embedding.backend == "auto"


def test_more_tasks_than_slots_run_only_as_many_at_once_as_the_pool_allows() -> None:
    from dag_factory.runtime import settings_from_mapping

    embedding = settings_from_mapping(
        {"collection": "faq", "embedding": {"provider": "hash", "pool_slots": 3, "parallel_tasks": 8}}
    ).embedding
    assert (embedding.parallel_tasks, embedding.concurrent_tasks) == (8, 3)


@pytest.mark.parametrize(
    ("provider", "option", "value", "owner"),
    [
        ("hash", "device", "cuda", "sentence-transformers"),
        ("openai", "threads", 2, "sentence-transformers"),
        ("openai", "backend", "onnx", "sentence-transformers"),
        ("sentence-transformers", "max_concurrent_requests", 8, "openai"),
        ("hash", "max_tokens_per_request", 100_000, "openai"),
    ],
)
def test_an_option_of_another_provider_is_refused_with_the_fix(
    provider: str, option: str, value: object, owner: str
) -> None:
    with pytest.raises(
        ValidationError, match=rf"{option}: applies to provider '{owner}' only.*provider: {owner}"
    ):
        EmbeddingSpec.model_validate({"provider": provider, option: value})


def test_search_defaults_to_hybrid_over_an_english_keyword_index(minimal: CollectionSpec) -> None:
    assert minimal.search.model_dump() == {
        "mode": "hybrid",
        "text_config": "english",
        "rrf_k": 60,
        "candidates": 40,
    }


@pytest.mark.parametrize("text_config", ["simple", "english", "pg_catalog.german", "public.code_words"])
def test_a_text_search_configuration_may_be_schema_qualified(text_config: str) -> None:
    assert SearchSpec(text_config=text_config).text_config == text_config


@pytest.mark.parametrize("text_config", ["English", "english; drop table x", "'english'", "a.b.c", ""])
def test_a_text_search_configuration_must_be_a_name(text_config: str) -> None:
    with pytest.raises(ValidationError, match="must name a Postgres text search configuration"):
        SearchSpec(text_config=text_config)


def test_an_unknown_search_mode_lists_the_modes() -> None:
    with pytest.raises(ValidationError, match="'vector', 'keyword' or 'hybrid'"):
        SearchSpec.model_validate({"mode": "semantic"})

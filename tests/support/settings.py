"""Settings for tests, built as the DAG factory builds them: from a spec, with the spec's defaults."""

from __future__ import annotations

from typing import Any

from capstone.index_build import IndexParams
from capstone.settings import CollectionSettings, EmbeddingSettings
from dag_factory.runtime import settings_from_mapping

__all__ = ["collection_settings", "embedding_settings", "index_params"]


def collection_settings(
    collection: str, schema: str, table: str | None = None, **sections: Any
) -> CollectionSettings:
    """A hash-provider collection in ``schema.table`` (default: the collection's name); a section
    given as a dict is merged into the spec's (``embedding={"dimension": 32}``), others replace."""
    raw: dict[str, Any] = {
        "collection": collection,
        "embedding": {"provider": "hash"},
        "store": {"schema": schema, "table": table or collection},
    }
    for key, value in sections.items():
        merged = isinstance(value, dict) and isinstance(raw.get(key), dict)
        raw[key] = {**raw[key], **value} if merged else value
    return settings_from_mapping(raw)


def embedding_settings(provider: str = "hash", **embedding: Any) -> EmbeddingSettings:
    """The ``embedding`` settings of a collection whose spec says ``provider`` and ``embedding``."""
    return collection_settings(
        "embedding_test", "public", embedding={"provider": provider, **embedding}
    ).embedding


def index_params(schema: str, table: str, **index: Any) -> IndexParams:
    """The index of ``schema.table`` for an ``index`` section (the spec's defaults: HNSW, cosine)."""
    return IndexParams.of(collection_settings("index_test", schema, table, index=index))

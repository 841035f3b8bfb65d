"""What the tasks of one collection's DAG need to know, as a plain frozen dataclass.

Kept free of heavy imports (numpy, psycopg): the DAG factory builds one of these per collection
every time Airflow parses the DAGs folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capstone.store import CollectionTable

__all__ = ["PipelineSettings"]


@dataclass(frozen=True)
class PipelineSettings:
    """Everything the tasks need to know about one collection (built by the DAG factory)."""

    collection: str
    schema: str
    table: str
    dimension: int
    provider: str = "hash"
    model: str = "hash-v1"
    normalize: bool = True
    connection_id: str = "vector_store_default"
    embed_batch_size: int = 512
    request_batch_size: int = 64
    upsert_batch_size: int = 5000
    upsert_parallelism: int = 2
    max_chunk_chars: int = 8000
    max_chunks_per_document: int = 10_000
    base_url: str | None = None
    api_key_connection_id: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout_seconds: float = 60.0
    default_location: str | None = None
    max_rejected_fraction: float = 0.5
    max_delete_fraction: float = 0.5

    @property
    def store_table(self) -> CollectionTable:
        from capstone.store import CollectionTable

        return CollectionTable(self.schema, self.table, self.dimension)

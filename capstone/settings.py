"""What the tasks of one collection's DAG run on: typed, immutable settings, named as in the YAML.

Every setting is declared once, with its default and bounds, in the collection spec
(``dag_factory.spec``); ``dag_factory.runtime.collection_settings`` builds these objects from it,
and ``capstone`` (which never imports ``dag_factory``) receives them whole. So the dataclasses here
carry no defaults of their own. What the spec and ``capstone`` both need to know (the provider,
index and metric names, pgvector's limits, the providers' default models) is declared here, once.

Kept free of heavy imports (numpy, psycopg): the DAG factory builds one of these per collection
every time Airflow parses the DAGs folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from capstone.store import CollectionTable

__all__ = [
    "CHECKS",
    "DEFAULT_CHUNK_CHARS",
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_CONNECTION_ID",
    "DEFAULT_MODELS",
    "DEFAULT_SEARCH_MODE",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_EF_SEARCH",
    "HNSW_M",
    "INDEX_TYPES",
    "IVFFLAT_LISTS",
    "MAX_INDEXED_DIMENSION",
    "MAX_INDEXED_DIMENSIONS",
    "MEMORY_SIZE",
    "METRICS",
    "PROVIDERS",
    "SEARCH_MODES",
    "TEXT_SEARCH_COLUMN",
    "Backend",
    "Check",
    "ChunkFormat",
    "ChunkUnit",
    "ChunkingSettings",
    "CollectionSettings",
    "Device",
    "EmbeddingSettings",
    "IndexSettings",
    "IndexType",
    "Metric",
    "Provider",
    "Quantization",
    "QueryChecksPolicy",
    "SampleQuery",
    "SearchMode",
    "SearchSettings",
    "SourceSettings",
    "StoreSettings",
    "TableSourceSettings",
    "ValidationSettings",
    "VectorType",
    "embedding_fingerprint",
    "vector_type_for",
]

Provider = Literal["hash", "sentence-transformers", "openai"]
Device = Literal["auto", "cpu", "cuda", "mps"]
# What runs a local model: torch (sentence-transformers) or ONNX Runtime; auto picks (see
# capstone.embeddings.local_backend). Both give the same vectors, so it is not in the fingerprint.
Backend = Literal["auto", "torch", "onnx"]
ChunkUnit = Literal["auto", "tokens", "characters"]
ChunkFormat = Literal["text", "markdown"]
# chunking.size when the spec leaves it out, by what it counts.
DEFAULT_CHUNK_TOKENS = 200
DEFAULT_CHUNK_CHARS = 1000
IndexType = Literal["hnsw", "ivfflat"]
Metric = Literal["cosine", "l2", "inner_product"]
VectorType = Literal["vector", "halfvec"]
Quantization = Literal["none", "binary"]
Check = Literal["vector_count", "query_relevance", "recall", "freshness"]
SearchMode = Literal["vector", "keyword", "hybrid"]
QueryChecksPolicy = Literal["always", "when_changed"]
PROVIDERS: tuple[Provider, ...] = get_args(Provider)
INDEX_TYPES: tuple[IndexType, ...] = get_args(IndexType)
METRICS: tuple[Metric, ...] = get_args(Metric)
CHECKS: tuple[Check, ...] = get_args(Check)
SEARCH_MODES: tuple[SearchMode, ...] = get_args(SearchMode)
# How a search ranks when neither the caller nor the collection says: what the held-out queries of
# benchmarks/search_quality.py answered best (see benchmarks/RESULTS.md).
DEFAULT_SEARCH_MODE: SearchMode = "hybrid"

# The Airflow connection of the collection's Postgres when the spec names none.
DEFAULT_CONNECTION_ID = "vector_store_default"

# provider -> (default model, its dimension)
DEFAULT_MODELS: dict[Provider, tuple[str, int]] = {
    "hash": ("hash-v1", 384),
    "sentence-transformers": ("all-MiniLM-L6-v2", 384),
    "openai": ("text-embedding-3-small", 1536),
}

# pgvector's limits (inclusive): the spec's bounds, and what IndexParams checks.
MAX_INDEXED_DIMENSION = 2000  # HNSW and IVFFlat index `vector` columns of at most 2,000 dimensions
# ... and `halfvec` columns (2-byte floats) of at most 4,000.
MAX_INDEXED_DIMENSIONS: dict[VectorType, int] = {"vector": MAX_INDEXED_DIMENSION, "halfvec": 4000}
HNSW_M = (2, 100)
HNSW_EF_CONSTRUCTION = (4, 1000)
HNSW_EF_SEARCH = (1, 1000)
IVFFLAT_LISTS = (1, 32768)
# The generated tsvector column of every collection table, which keyword search reads and the
# keyword (GIN) index holds.
TEXT_SEARCH_COLUMN = "content_tsv"
# A Postgres size for maintenance_work_mem, as the spec and the index build accept it.
MEMORY_SIZE = r"([1-9][0-9]{0,6})(kB|MB|GB)"


@dataclass(frozen=True)
class TableSourceSettings:
    """``source.table``: a Postgres table the collection follows, row by row (one document per row).

    ``connection_id`` is resolved (the store's when the spec leaves it out). ``updated_at_column``
    set: the table is followed without triggers (:data:`capture_mode` ``watermark``), polled every
    ``poll_seconds``, each run re-reading ``lookback_seconds`` before the last mark.
    """

    schema: str
    table: str
    id_column: str
    content_column: str
    metadata_columns: tuple[str, ...]
    connection_id: str
    updated_at_column: str | None = None
    lookback_seconds: float = 300.0
    poll_seconds: float = 30.0

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def capture_mode(self) -> str:
        """``triggers`` (a capture queue the table's triggers write) or ``watermark`` (updated_at)."""
        return "triggers" if self.updated_at_column is None else "watermark"


@dataclass(frozen=True)
class SourceSettings:
    """``source``: where a run's batches come from when no event names one, the table the collection
    follows (if any), and the reject guard."""

    default_location: str | None
    max_rejected_fraction: float
    table: TableSourceSettings | None = None


@dataclass(frozen=True)
class ChunkingSettings:
    """``chunking``: how a document without chunks is split (``size`` and ``overlap`` in ``unit``s,
    ``auto`` resolved), and the limits on every chunk."""

    size: int
    overlap: int
    unit: Literal["tokens", "characters"]
    format: ChunkFormat
    max_chunk_chars: int
    max_chunks_per_document: int


@dataclass(frozen=True)
class EmbeddingSettings:
    """``embedding``: the provider and model, resolved (model and dimension filled in), and how the
    embedding calls are made. ``normalize`` follows from the index metric."""

    provider: Provider
    model: str
    dimension: int
    normalize: bool
    batch_size: int
    # Mapped embedding tasks per run (resolved: pool_slots unless the spec says otherwise), and the
    # slots of the pool they run in, which bound how many run at once.
    parallel_tasks: int
    pool_slots: int
    request_batch_size: int
    device: Device
    threads: int | None
    backend: Backend
    base_url: str | None
    connection_id: str | None
    api_key_env: str
    request_timeout_seconds: float
    max_concurrent_requests: int
    max_tokens_per_request: int

    @property
    def concurrent_tasks(self) -> int:
        """How many of a run's embedding tasks run at once (what the default torch threads follow)."""
        return min(self.parallel_tasks, self.pool_slots)


def vector_type_for(dimension: int) -> VectorType:
    """``store.vector_type: auto``: ``vector`` (4-byte floats) where pgvector indexes it, ``halfvec``
    (2-byte floats) above that."""
    return "vector" if dimension <= MAX_INDEXED_DIMENSION else "halfvec"


def embedding_fingerprint(
    embedding: EmbeddingSettings, vector_type: VectorType, revision: str | None = None
) -> str:
    """16 hex digits naming what determines a collection's vectors: the provider, the model and its
    ``revision`` (where the provider knows one), the dimension, normalisation and the column type.

    Each fingerprint gets its own version of the collection (:mod:`capstone.versions`), and every
    chunk's content hash covers it: changing any of these re-embeds every chunk into a new version.
    How the embedding calls are made (batch sizes, threads, the device, torch or ONNX Runtime, the
    API's address) is left out: it does not change the vectors (ONNX Runtime's vectors of the bundled
    model are torch's to a cosine of 0.9999998, with the same neighbours: benchmarks/RESULTS.md).
    """
    parts = {
        "provider": embedding.provider,
        "model": embedding.model,
        "revision": revision,
        "dimension": embedding.dimension,
        "normalize": embedding.normalize,
        "vector_type": vector_type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StoreSettings:
    """``store``: the Postgres table (``table`` resolved to the collection name by default) and the
    type of its embedding column (``vector_type`` resolved from ``auto``)."""

    connection_id: str
    schema: str
    table: str
    max_delete_fraction: float
    vector_type: VectorType
    # Earlier versions kept (their tables) after a switch to a new one, for `capstone rollback`.
    keep_versions: int


@dataclass(frozen=True)
class IndexSettings:
    """``index``: the ANN index the triggerer builds and the query-time knobs searches use."""

    type: IndexType
    metric: Metric
    m: int
    ef_construction: int
    ef_search: int
    lists: int | None
    probes: int
    # "binary": the HNSW index holds binary_quantize(embedding); searches re-rank this many of its
    # nearest by Hamming distance with the full vectors.
    quantization: Quantization
    rerank_candidates: int
    build_timeout_seconds: float
    poll_interval_seconds: float
    # Builds over at most this many rows run in the wait_for_indexing task, not the triggerer.
    in_worker_max_rows: int
    maintenance_work_mem: str


@dataclass(frozen=True)
class SearchSettings:
    """``search``: how the collection is searched by default, and its keyword index.

    ``text_config`` is the Postgres text search configuration of the table's generated
    ``content_tsv`` column (what the GIN index holds and keyword queries are parsed with);
    ``rrf_k`` and ``candidates`` shape hybrid ranking (reciprocal rank fusion of the top
    ``max(k, candidates)`` of each list, each hit scoring ``1 / (rrf_k + rank)`` per list it is in).
    """

    mode: SearchMode
    text_config: str
    rrf_k: int
    candidates: int


@dataclass(frozen=True)
class SampleQuery:
    """A question users ask and the document that must answer it."""

    id: str
    query: str
    expected_document_id: str


@dataclass(frozen=True)
class ValidationSettings:
    """``validation``: the index health checks and which of them fail the task."""

    sample_queries: tuple[SampleQuery, ...]
    top_k: int
    recall_k: int
    recall_sample_size: int
    recall_threshold: float
    freshness_limit_seconds: float
    fail_on: tuple[Check, ...]
    query_checks: QueryChecksPolicy = "when_changed"
    query_checks_every: int = 10
    query_checks_changed_fraction: float = 0.05


@dataclass(frozen=True)
class CollectionSettings:
    """One collection, as its tasks run it."""

    collection: str
    source: SourceSettings
    chunking: ChunkingSettings
    embedding: EmbeddingSettings
    store: StoreSettings
    index: IndexSettings
    upsert_batch_size: int
    upsert_parallelism: int
    validation: ValidationSettings
    search: SearchSettings

    @property
    def store_table(self) -> CollectionTable:
        """The collection's table: the dimension of its vector column, the text search configuration
        of its keyword column."""
        from capstone.store import CollectionTable

        return CollectionTable(
            self.store.schema,
            self.store.table,
            self.embedding.dimension,
            self.search.text_config,
            self.store.vector_type,
        )

"""The collection spec: what one YAML file in ``configs/`` may say, as Pydantic models.

A minimal file is five lines (collection name, provider); everything else has a default that
works on the embedded Postgres. ``extra="forbid"`` everywhere, so a typo is an error, not a
silently ignored key.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from capstone.settings import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_CONNECTION_ID,
    DEFAULT_MODELS,
    DEFAULT_SEARCH_MODE,
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    IVFFLAT_LISTS,
    MAX_INDEXED_DIMENSION,
    MAX_INDEXED_DIMENSIONS,
    MEMORY_SIZE,
    Backend,
    Check,
    ChunkFormat,
    ChunkUnit,
    Device,
    IndexType,
    Metric,
    Provider,
    Quantization,
    QueryChecksPolicy,
    SearchMode,
    VectorType,
    vector_type_for,
)
from dag_factory.errors import InvalidField

__all__ = [
    "DEFAULT_MODELS",
    "MAX_INDEXED_DIMENSION",
    "ChunkingSpec",
    "CollectionSpec",
    "DagSpec",
    "EmbeddingSpec",
    "IndexSpec",
    "SampleQuery",
    "SearchSpec",
    "SourceSpec",
    "StoreSpec",
    "ValidationSpec",
]

# Postgres truncates identifiers at 63 bytes; we refuse rather than truncate.
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_ASSET = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,199}$")
_POOL = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")
_TEXT_CONFIG = re.compile(r"^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


def _suggest_name(value: str) -> str:
    """A name close to ``value`` that passes the identifier rules, for error messages."""
    name = re.sub(r"[^a-z0-9_]+", "_", value.strip().lower()).strip("_")[:63]
    return f"; try {name!r}" if name and name != value and _NAME.fullmatch(name) else ""


def _identifier(value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            "must be a plain lower-case SQL identifier (letters a-z, digits and '_', starting with "
            f"a letter or '_', at most 63 bytes), got {value!r}{_suggest_name(value)}"
        )
    return value


def _asset(value: str | None) -> str | None:
    if value is not None and not _ASSET.fullmatch(value):
        raise ValueError(f"asset names use letters, digits and . _ - : / only, got {value!r}")
    return value


# Following a table by its updated_at column: how often to look, how far back each run re-reads.
DEFAULT_POLL_SECONDS = 30
DEFAULT_LOOKBACK_SECONDS = 300


def _watermark_option(field: str, value: float, default: float, info: ValidationInfo) -> float:
    """``value`` of ``field``, refused when set without ``updated_at`` (it would do nothing)."""
    if info.data.get("updated_at") is None and value != default:
        raise ValueError(
            f"{field} only applies with updated_at (a table followed without triggers): set "
            "updated_at, or remove it"
        )
    return value


class TableSourceSpec(_Model):
    """A Postgres table the collection follows: one document per row, every insert, update and
    delete captured by triggers the first run installs; or, with ``updated_at``, found from that
    column and the table's ids, where triggers may not be created (see capstone.table_source)."""

    name: str = Field(description="The table, as 'schema.table' (or 'table', in public).")
    id: str = Field(default="id", description="Column whose value is the document id (a key).")
    content: str = Field(default="content", description="Text column chunked into the document's chunks.")
    metadata: list[str] = Field(
        default_factory=list, description="Columns stored as the chunks' metadata (JSON), by name."
    )
    connection_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=250,
        description="Airflow connection of the table's database; default: store.connection_id.",
    )
    updated_at: str | None = Field(
        default=None,
        description="Where the connection's role may not create triggers on the table: a timestamp "
        "column the application sets on every insert and update. No capture is installed; the table "
        "is polled every poll_seconds, each run reads the rows whose updated_at passed the last run's "
        "mark (less lookback_seconds) and compares the table's ids with the collection's for deletes.",
    )
    lookback_seconds: float = Field(
        default=DEFAULT_LOOKBACK_SECONDS,
        ge=0,
        le=86_400,
        description="With updated_at: each run also re-reads the rows of this many seconds before the "
        "last mark, for transactions that committed after a later one (unchanged text embeds nothing).",
    )
    poll_seconds: float = Field(
        default=DEFAULT_POLL_SECONDS,
        ge=1,
        le=3_600,
        description="With updated_at: seconds between two looks at the table (max(updated_at), count).",
    )

    # One validator per field, each naming its own: pydantic 2.12.0 gives a nested model's field
    # validator the outer field's name in ``info.field_name``.
    @field_validator("lookback_seconds")
    @classmethod
    def _lookback_needs_updated_at(cls, value: float, info: ValidationInfo) -> float:
        return _watermark_option("lookback_seconds", value, DEFAULT_LOOKBACK_SECONDS, info)

    @field_validator("poll_seconds")
    @classmethod
    def _poll_needs_updated_at(cls, value: float, info: ValidationInfo) -> float:
        return _watermark_option("poll_seconds", value, DEFAULT_POLL_SECONDS, info)

    @field_validator("name")
    @classmethod
    def _table_name(cls, value: str) -> str:
        for part in value.split(".", 1):
            _identifier(part)
        return value

    @field_validator("id", "content")
    @classmethod
    def _column(cls, value: str) -> str:
        return _identifier(value)

    @field_validator("updated_at")
    @classmethod
    def _updated_at_column(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value)

    @field_validator("metadata")
    @classmethod
    def _metadata_columns(cls, value: list[str]) -> list[str]:
        for column in value:
            _identifier(column)
        repeated = sorted({column for column in value if value.count(column) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(repeated)} more than once")
        return value

    @property
    def schema_and_table(self) -> tuple[str, str]:
        schema, _, table = self.name.rpartition(".")
        return schema or "public", table


class SourceSpec(_Model):
    """Where the collection's enriched documents come from: batches an upstream pipeline announces
    through its asset, and (or) a table the collection follows."""

    asset: str | None = Field(
        default=None,
        description="Upstream Asset name whose events schedule this DAG; default '<collection>.enriched'.",
    )
    default_location: str | None = Field(
        default=None,
        description="JSONL file read when a run has no triggering asset event (e.g. a manual run).",
    )
    table: TableSourceSpec | None = Field(
        default=None,
        description="A Postgres table to follow: its changes reach the collection within seconds.",
    )
    max_rejected_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="A batch that rejects more than this fraction of its documents fails the run before "
        "anything is written (a wrong path or format, not a few bad documents); 1 turns the guard off.",
    )

    @field_validator("asset")
    @classmethod
    def _asset_name(cls, value: str | None) -> str | None:
        return _asset(value)


class ChunkingSpec(_Model):
    """How a document that arrives without ``chunks`` is split from its ``content``, and the limits
    every chunk (given or split) must keep."""

    size: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Largest chunk, in `unit`s; default 200 tokens (all-MiniLM-L6-v2 reads 256) or 1000 "
        "characters.",
    )
    overlap: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="`unit`s a chunk repeats from the end of the one before it; less than `size`.",
    )
    unit: ChunkUnit = Field(
        default="auto",
        description="What `size` counts: the embedding model's tokens (the local model's own tokenizer, "
        "tiktoken's for OpenAI models) or characters; auto: tokens, characters for the hash provider.",
    )
    format: ChunkFormat = Field(
        default="text",
        description="text: split at paragraphs, then lines, sentences, words; markdown: at headings and "
        "blocks first.",
    )
    max_chunk_chars: int = Field(
        default=8000,
        ge=1,
        le=1_000_000,
        description="A chunk longer than this is set aside with a reason instead of being embedded.",
    )
    max_chunks_per_document: int = Field(default=10_000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingSpec:
        size = self.size or (DEFAULT_CHUNK_CHARS if self.unit == "characters" else DEFAULT_CHUNK_TOKENS)
        if self.overlap >= size:
            raise InvalidField("overlap", f"must be less than size ({size}), got {self.overlap}")
        return self


# Embedding options that mean something to one provider only: set for another, they are an error.
_PROVIDER_ONLY: dict[str, Provider] = {
    "base_url": "openai",
    "connection_id": "openai",
    "max_concurrent_requests": "openai",
    "max_tokens_per_request": "openai",
    "device": "sentence-transformers",
    "threads": "sentence-transformers",
    "backend": "sentence-transformers",
}


class EmbeddingSpec(_Model):
    """How chunk texts become vectors, and how the mapped embedding tasks run."""

    provider: Provider = "hash"
    model: str | None = Field(default=None, description="Model name; default depends on the provider.")
    dimension: int | None = Field(default=None, ge=1, le=16000)
    batch_size: int = Field(
        default=512,
        ge=1,
        le=100_000,
        description="Chunks a generate_embedding task embeds and stages at a time: the unit of its "
        "progress log and of resumption (a retried task skips the batches its earlier try staged). "
        "At least 16 forward passes (local model) or max_concurrent_requests requests (openai).",
    )
    parallel_tasks: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Mapped generate_embedding tasks a run's chunks are shared among (never more than "
        "its batches, nor Airflow's max_map_length); default pool_slots: every slot works and each "
        "task loads the model once.",
    )
    request_batch_size: int = Field(
        default=64,
        ge=1,
        le=2048,
        description="Texts per call to the provider: per request (openai), per forward pass (local model).",
    )
    pool: str = Field(default="embedding", description="Airflow pool the embedding tasks run in.")
    pool_slots: int = Field(default=2, ge=1, le=1024, description="Slots the pool is created with.")
    device: Device = Field(
        default="auto",
        description="sentence-transformers: where the model runs; auto picks CUDA, then MPS, when torch "
        "sees one, else the CPU.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="sentence-transformers on the CPU: torch threads per embedding task; default the "
        "worker's cores divided by the tasks that run at once (min of pool_slots and parallel_tasks).",
    )
    backend: Backend = Field(
        default="auto",
        description="sentence-transformers: what runs the model. onnx: ONNX Runtime (no torch in the "
        "task: starts in ~0.3 s instead of ~4 s, same vectors); torch: sentence-transformers; auto: "
        "onnx on the CPU where onnxruntime is installed and the model mean-pools a Transformer (the "
        "bundled one does), else torch. The ONNX file is exported once per host (python -m capstone "
        "export-model). Not part of the embedding fingerprint: switching it re-embeds nothing.",
    )
    max_concurrent_requests: int = Field(
        default=4, ge=1, le=64, description="openai: requests one embedding task keeps in flight at once."
    )
    max_tokens_per_request: int = Field(
        default=200_000,
        ge=1_000,
        le=10_000_000,
        description="openai: estimated tokens summed over one request's inputs (OpenAI caps it at "
        "300,000; estimated as UTF-8 bytes / 3, which errs high).",
    )
    retries: int = Field(default=3, ge=0, le=50)
    retry_delay_seconds: float = Field(default=5.0, ge=0, le=86_400)
    max_retry_delay_seconds: float = Field(default=300.0, ge=0, le=86_400)
    base_url: str | None = Field(default=None, description="OpenAI-compatible server URL (openai only).")
    connection_id: str | None = Field(
        default=None,
        description="Airflow connection holding the API key in its password (openai only).",
    )
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Env var read when no connection.")
    request_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("pool")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        if not _POOL.fullmatch(value):
            raise ValueError(f"pool names use letters, digits and . _ - only, got {value!r}")
        return value

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODELS[self.provider][0]

    @property
    def vector_dimension(self) -> int:
        if self.dimension is not None:
            return self.dimension
        default_model, default_dim = DEFAULT_MODELS[self.provider]
        if self.model in (None, default_model):
            return default_dim
        raise ValueError("dimension is required when model is not the provider's default")

    @model_validator(mode="after")
    def _dimension_known(self) -> EmbeddingSpec:
        default_model = DEFAULT_MODELS[self.provider][0]
        if self.dimension is None and self.model not in (None, default_model):
            raise InvalidField(
                "dimension",
                f"required for model {self.model!r}: set it to the length of the vectors the model returns",
            )
        top = MAX_INDEXED_DIMENSIONS["halfvec"]
        if self.dimension is not None and self.dimension > top:
            # The vector type holds up to 16,000 dimensions, but pgvector indexes at most 2,000 of
            # `vector` and 4,000 of `halfvec`.
            raise InvalidField(
                "dimension",
                f"{self.dimension} is above pgvector's index limit of {top} (halfvec; "
                f"{MAX_INDEXED_DIMENSION} for vector): pick a smaller model or dimension (OpenAI's "
                "text-embedding-3 models take `dimension: 3072` or less)",
            )
        for option, provider in _PROVIDER_ONLY.items():
            # Set to something other than its default: a null or default value is harmless.
            default = type(self).model_fields[option].default
            if self.provider != provider and getattr(self, option) != default:
                raise InvalidField(
                    option, f"applies to provider {provider!r} only: remove it or set `provider: {provider}`"
                )
        if self.max_retry_delay_seconds < self.retry_delay_seconds:
            raise InvalidField(
                "max_retry_delay_seconds",
                f"must be at least retry_delay_seconds ({self.retry_delay_seconds}), "
                f"got {self.max_retry_delay_seconds}",
            )
        return self


class StoreSpec(_Model):
    """The Postgres table the collection lives in."""

    connection_id: str = Field(default=DEFAULT_CONNECTION_ID, min_length=1, max_length=250)
    schema_name: str = Field(default="public", alias="schema")
    table: str | None = Field(default=None, description="Default: the collection name.")
    vector_type: Literal["auto", "vector", "halfvec"] = Field(
        default="auto",
        description="Type of the embedding column: 'vector' (4-byte floats, indexed up to 2,000 "
        "dimensions), 'halfvec' (2-byte floats: half the size, indexed up to 4,000 dimensions), or "
        "'auto' (vector up to 2,000 dimensions, halfvec above).",
    )
    max_delete_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="A run that would delete more than this fraction of the collection's rows (chunks "
        "documents lost, documents deleted upstream) fails before writing, unless its conf says "
        '{"allow_mass_delete": true}; 1 turns the guard off.',
    )
    keep_versions: int = Field(
        default=1,
        ge=0,
        le=10,
        description="How many earlier versions of the collection (tables of earlier embedding "
        "models) are kept after a switch to a new one, for `python -m capstone rollback`; 0 drops the "
        "old version as soon as the new one is live.",
    )

    @field_validator("schema_name")
    @classmethod
    def _schema(cls, value: str) -> str:
        return _identifier(value)

    @field_validator("table")
    @classmethod
    def _table(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value)


class IndexSpec(_Model):
    """The ANN index built in the triggerer, and how search uses it."""

    type: IndexType = "hnsw"
    metric: Metric = "cosine"
    m: int = Field(default=16, ge=HNSW_M[0], le=HNSW_M[1], description="HNSW: links per node.")
    ef_construction: int = Field(
        default=64,
        ge=HNSW_EF_CONSTRUCTION[0],
        le=HNSW_EF_CONSTRUCTION[1],
        description="HNSW: build candidate list.",
    )
    ef_search: int = Field(
        default=100, ge=HNSW_EF_SEARCH[0], le=HNSW_EF_SEARCH[1], description="HNSW: search candidate list."
    )
    lists: int | None = Field(
        default=None, ge=IVFFLAT_LISTS[0], le=IVFFLAT_LISTS[1], description="IVFFlat: number of lists."
    )
    probes: int = Field(
        default=10, ge=IVFFLAT_LISTS[0], le=IVFFLAT_LISTS[1], description="IVFFlat: lists searched per query."
    )
    quantization: Quantization = Field(
        default="none",
        description="'binary': the HNSW index holds binary_quantize(embedding) (one bit per dimension, "
        "~1/32 of the vectors' size, built ~5x faster) and a search re-ranks its rerank_candidates nearest "
        "by Hamming distance with the full vectors. 'none': the index holds the vectors.",
    )
    rerank_candidates: int = Field(
        default=200,
        ge=1,
        le=HNSW_EF_SEARCH[1],
        description="quantization 'binary': how many candidates a search re-ranks by the full vectors.",
    )
    build_timeout_seconds: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    poll_interval_seconds: float = Field(default=30.0, gt=0, le=3600)
    in_worker_max_rows: int = Field(
        default=10_000,
        ge=0,
        le=10_000_000,
        description="An index over at most this many rows is built by the wait_for_indexing task itself "
        "(a few seconds of the worker's time) instead of being deferred to the triggerer, which costs "
        "a round trip of several seconds; 0 defers every build.",
    )
    maintenance_work_mem: str = Field(
        default="auto",
        description="'auto' sizes it from the data (capped at 1GB), or a Postgres size like '512MB'.",
    )

    @field_validator("maintenance_work_mem")
    @classmethod
    def _memory(cls, value: str) -> str:
        if value != "auto" and not re.fullmatch(MEMORY_SIZE, value):
            raise ValueError(f"must be 'auto' or a Postgres size such as '256MB' or '1GB', got {value!r}")
        return value

    @model_validator(mode="after")
    def _params(self) -> IndexSpec:
        if self.type == "ivfflat" and self.lists is None:
            raise InvalidField(
                "lists", "required for type 'ivfflat': add `lists: <n>` (rows / 1000 is a good start)"
            )
        if self.type == "ivfflat" and self.lists is not None and self.probes > self.lists:
            raise InvalidField("probes", f"cannot exceed lists ({self.lists}), got {self.probes}")
        if self.quantization == "binary" and self.type != "hnsw":
            raise InvalidField(
                "quantization", "'binary' needs type 'hnsw' (set type: hnsw, or quantization: none)"
            )
        if self.type == "hnsw" and self.ef_construction < 2 * self.m:
            raise InvalidField(
                "ef_construction", f"must be at least 2 * m = {2 * self.m}, got {self.ef_construction}"
            )
        return self


class SearchSpec(_Model):
    """How the collection is searched: the default mode, the keyword index, hybrid ranking."""

    mode: SearchMode = Field(
        default=DEFAULT_SEARCH_MODE,
        description="Default search mode: 'vector' (nearest embeddings), 'keyword' (Postgres full "
        "text search) or 'hybrid' (reciprocal rank fusion of both). Validation's sample queries run "
        "in this mode.",
    )
    text_config: str = Field(
        default="english",
        description="Postgres text search configuration of the keyword index: 'english' stems words; "
        "'simple' keeps every token as written (code, identifiers, mixed languages).",
        json_schema_extra={"pattern": _TEXT_CONFIG.pattern},
    )
    rrf_k: int = Field(
        default=60, ge=1, le=10_000, description="Hybrid: the k of 1 / (k + rank) in reciprocal rank fusion."
    )
    candidates: int = Field(
        default=40,
        ge=1,
        le=HNSW_EF_SEARCH[1],
        description="Hybrid: how many of each list's best hits are fused (k, when k is larger; also the "
        "least ef_search).",
    )

    @field_validator("text_config")
    @classmethod
    def _text_config(cls, value: str) -> str:
        if not _TEXT_CONFIG.fullmatch(value):
            raise ValueError(
                "must name a Postgres text search configuration such as 'english' or 'simple' (an "
                f"identifier, optionally schema-qualified), got {value!r}"
            )
        return value


class SampleQuery(_Model):
    """A question users ask and the document that must answer it."""

    id: str = Field(pattern=r"^[a-z0-9_]{1,60}$")
    query: str = Field(min_length=1, max_length=2000)
    expected_document_id: str = Field(min_length=1)


class ValidationSpec(_Model):
    """Index health checks run after the build."""

    sample_queries: list[SampleQuery] = Field(default_factory=list)
    top_k: int = Field(default=5, ge=1, le=1000)
    recall_k: int = Field(default=10, ge=1, le=1000)
    recall_sample_size: int = Field(default=50, ge=1, le=10_000)
    recall_threshold: float = Field(default=0.9, ge=0, le=1)
    freshness_limit_seconds: float = Field(default=3600.0, gt=0)
    fail_on: list[Check] = Field(default_factory=lambda: list[Check](["vector_count"]))
    query_checks: QueryChecksPolicy = Field(
        default="when_changed",
        description=(
            "When the sample queries run (they load the embedding model): `always`, or `when_changed`: "
            "on the first validation, a new version, a rebuilt index, changed sample queries or search "
            "settings, a share of rows changed of at least query_checks_changed_fraction, after a query "
            "check that did not pass, and every query_checks_every-th validation."
        ),
    )
    query_checks_every: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="With `when_changed`: run the sample queries at least every N validations.",
    )
    query_checks_changed_fraction: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="With `when_changed`: the share of rows upserted or deleted that makes the queries run.",
    )

    @field_validator("sample_queries")
    @classmethod
    def _unique_ids(cls, queries: list[SampleQuery]) -> list[SampleQuery]:
        first: dict[str, int] = {}
        for position, query in enumerate(queries):
            if query.id in first:
                raise InvalidField(
                    f"[{position}].id",
                    f"{query.id!r} is already the id of sample_queries[{first[query.id]}]: "
                    "give each sample query its own id",
                )
            first[query.id] = position
        return queries


class DagSpec(_Model):
    """Airflow options of the generated DAG."""

    owner: str = "data-platform"
    tags: list[str] = Field(default_factory=lambda: ["vector-index"])
    max_active_runs: int = Field(default=1, ge=1, le=64)
    retries: int = Field(default=1, ge=0, le=50, description="Default retries of the non-embedding tasks.")
    retry_delay_seconds: float = Field(default=30.0, ge=0)
    default_args: dict[str, Any] = Field(default_factory=dict)


class CollectionSpec(_Model):
    """One collection: one YAML file, one DAG, one table, one index."""

    collection: Annotated[str, Field(description="Collection name; also the DAG id and default table.")]
    description: str = ""
    source: SourceSpec = Field(default_factory=SourceSpec)
    output_asset: str | None = Field(default=None, description="Default '<collection>.indexed'.")
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    index: IndexSpec = Field(default_factory=IndexSpec)
    upsert_batch_size: int = Field(default=5000, ge=1, le=1_000_000)
    upsert_parallelism: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Connections merging upsert batches at once; each batch stays its own transaction.",
    )
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    dag: DagSpec = Field(default_factory=DagSpec)

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                "must start with a lower-case letter and use only a-z, 0-9 and '_' "
                f"(at most 63 bytes), got {value!r}{_suggest_name(value)}"
            )
        return value

    @field_validator("output_asset")
    @classmethod
    def _output(cls, value: str | None) -> str | None:
        return _asset(value)

    @property
    def vector_type(self) -> VectorType:
        """``store.vector_type``, ``auto`` resolved from the embedding dimension."""
        chosen = self.store.vector_type
        return vector_type_for(self.embedding.vector_dimension) if chosen == "auto" else chosen

    @model_validator(mode="after")
    def _cross_checks(self) -> CollectionSpec:
        dimension, chosen = self.embedding.vector_dimension, self.store.vector_type
        if chosen == "vector" and dimension > MAX_INDEXED_DIMENSION:
            raise InvalidField(
                "store.vector_type",
                f"pgvector indexes 'vector' columns of at most {MAX_INDEXED_DIMENSION} dimensions and "
                f"embedding.dimension is {dimension}: use 'halfvec' (or 'auto', which picks it)",
            )
        if self.chunking.unit == "tokens" and self.embedding.provider == "hash":
            raise InvalidField(
                "chunking.unit",
                "the hash provider has no tokenizer to count tokens with: use `unit: characters` "
                "(or leave `unit` out)",
            )
        if self.source_asset == self.output_asset_name:
            raise InvalidField(
                "output_asset" if self.output_asset else "source.asset",
                f"source.asset and output_asset are both {self.source_asset!r}, so the DAG would "
                "trigger itself: give them different names",
            )
        return self

    @property
    def source_asset(self) -> str:
        return self.source.asset or f"{self.collection}.enriched"

    @property
    def output_asset_name(self) -> str:
        return self.output_asset or f"{self.collection}.indexed"

    @property
    def table_name(self) -> str:
        return self.store.table or self.collection

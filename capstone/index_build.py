"""Build a collection's indexes (the ANN index, HNSW or IVFFlat, and the keyword index, GIN over
the generated ``content_tsv`` column) so that it is safe to run more than once.

One coroutine, :func:`build_index`, serves the triggerer (``VectorStoreIndexingTrigger``) and the
non-deferrable sensor alike. For each index in turn (keyword first: it takes seconds where the
ANN index may take minutes) it runs ``CREATE INDEX CONCURRENTLY`` under an advisory lock keyed on
the index, logs progress from ``pg_stat_progress_create_index``, cleans up INVALID leftovers of
failed builds, follows a build another backend is already running, and swaps in an index with new
parameters beside the old one, dropping the old one only once the new one is valid.

Identifiers (schema, table, column, index names) are validated and quoted by :func:`quote_ident`;
values are always passed as query parameters.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import asyncpg

from capstone.connections import PostgresConnectionRefused, PostgresParams, refusal_reason
from capstone.contracts import IndexEvent
from capstone.errors import is_terminal
from capstone.settings import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    INDEX_TYPES,
    IVFFLAT_LISTS,
    MEMORY_SIZE,
    TEXT_SEARCH_COLUMN,
    CollectionSettings,
    IndexType,
    Metric,
    Quantization,
    VectorType,
)

__all__ = [
    "DISTANCE_OPERATORS",
    "OPCLASSES",
    "BuildLog",
    "IndexParams",
    "KeywordIndexParams",
    "build_index",
    "build_memory",
    "check_index",
    "is_managed_index_name",
    "quote_ident",
    "renamed_managed_index",
]

DISTANCE_OPERATORS: dict[Metric, str] = {"cosine": "<=>", "l2": "<->", "inner_product": "<#>"}
OPCLASSES: dict[VectorType, dict[Metric, str]] = {
    kind: {"cosine": f"{kind}_cosine_ops", "l2": f"{kind}_l2_ops", "inner_product": f"{kind}_ip_ops"}
    for kind in ("vector", "halfvec")
}

_MAX_IDENTIFIER_BYTES = 63  # Postgres silently truncates longer names (NAMEDATALEN - 1)
_MB = 1024 * 1024
_MEMORY_UNITS = {"kB": 1024, "MB": _MB, "GB": 1024 * _MB}
_MEMORY = re.compile(MEMORY_SIZE)
MIN_BUILD_MEMORY = 64 * _MB  # the server default: sizing never goes below it
MAX_AUTO_BUILD_MEMORY = 1024 * _MB
# How often the server checks, during a long query, that the client is still connected. A killed
# triggerer then aborts its build within about a second instead of leaving an orphan running.
CONNECTION_CHECK_INTERVAL = "1s"


class BuildLog(Protocol):
    """The logging calls the build makes (a ``logging.Logger`` or Airflow's ``self.log``)."""

    def info(self, msg: str, /, *args: Any) -> Any: ...

    def warning(self, msg: str, /, *args: Any) -> Any: ...


# -- identifiers and parameters -------------------------------------------------------------------


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier, after checking Postgres would keep it intact."""
    if not name or "\x00" in name or len(name.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"{name!r} is not a usable SQL identifier: it must be 1 to {_MAX_IDENTIFIER_BYTES} bytes "
            "with no NUL character"
        )
    return '"' + name.replace('"', '""') + '"'


def _truncate_utf8(text: str, max_bytes: int) -> str:
    # Cut on a character boundary: a split multi-byte character would be an invalid name.
    return text.encode()[:max_bytes].decode(errors="ignore")


def _within(value: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= value <= bounds[1]


def _check_hnsw(m: int, ef_construction: int) -> None:
    if not (_within(m, HNSW_M) and 2 * m <= ef_construction <= HNSW_EF_CONSTRUCTION[1]):
        raise ValueError(
            f"hnsw needs {HNSW_M[0]} <= m <= {HNSW_M[1]} and 2 * m <= ef_construction <= "
            f"{HNSW_EF_CONSTRUCTION[1]}, got m={m}, ef_construction={ef_construction}"
        )


def _index_name(table: str, index_type: str, params_hash: str) -> str:
    suffix = f"_{index_type}_{params_hash}"
    # Truncate the table part, never the hash: the hash is what tells parameter sets apart.
    return _truncate_utf8(table, _MAX_IDENTIFIER_BYTES - len(suffix.encode())) + suffix


def is_managed_index_name(name: str, table: str) -> bool:
    """True for names :class:`IndexParams` (for any parameters) and :class:`KeywordIndexParams`
    give to indexes on ``table``."""
    return renamed_managed_index(name, table, table) is not None


def renamed_managed_index(name: str, table: str, new_table: str) -> str | None:
    """What a managed index of ``table`` (see :func:`is_managed_index_name`) is called on
    ``new_table``, with the same parameters; None for other indexes."""
    for index_type in (*INDEX_TYPES, KeywordIndexParams.index_type):
        prefix = _index_name(table, index_type, "0" * 8)[:-8]
        rest = name[len(prefix) :]
        if name.startswith(prefix) and re.fullmatch(r"[0-9a-f]{8}", rest):
            return _index_name(new_table, index_type, rest)
    return None


def parse_memory(value: str) -> int:
    """Bytes in a Postgres size such as ``'256MB'`` (units kB, MB, GB)."""
    match = _MEMORY.fullmatch(value)
    if not match:
        raise ValueError(
            f"maintenance_work_mem must be 'auto' or a size like '256MB' or '1GB', got {value!r}"
        )
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


def build_memory(
    rows: int, dimension: int, index_type: str, setting: str = "auto", value_bytes: float = 4
) -> str:
    """``maintenance_work_mem`` for building the index over ``rows`` vectors of ``dimension``.

    The vectors take ``rows * dimension * value_bytes`` bytes (4 for vector, 2 for halfvec, 1/8 for
    binary quantization); an
    HNSW graph adds its neighbour lists, about as much again. The size is clamped to [64MB, 1GB],
    or to [.., setting] when the spec names one.
    """
    needed = int(rows * max(dimension, 0) * value_bytes * (2 if index_type == "hnsw" else 1))
    cap = MAX_AUTO_BUILD_MEMORY if setting == "auto" else parse_memory(setting)
    if cap <= max(needed, MIN_BUILD_MEMORY):
        return setting if setting != "auto" else f"{cap // _MB}MB"
    return f"{math.ceil(max(needed, MIN_BUILD_MEMORY) / _MB)}MB"


def _value_bytes(params: AnyIndex) -> float:
    """Bytes per dimension of what the index holds: 4 (vector), 2 (halfvec), 1/8 (binary)."""
    if not isinstance(params, IndexParams):
        return 4
    if params.quantization == "binary":
        return 0.125
    return 2 if params.vector_type == "halfvec" else 4


class _NamedIndex:
    """Names shared by the index kinds: quoted table and index, the build's advisory lock."""

    schema: str
    table: str

    @property
    def index_name(self) -> str:
        raise NotImplementedError  # each kind names its index

    @property
    def qualified_table(self) -> str:
        """Quoted ``schema.table``."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    def qualified_index(self, name: str | None = None) -> str:
        """Quoted ``schema.index`` (this index by default)."""
        return f"{quote_ident(self.schema)}.{quote_ident(name or self.index_name)}"

    @property
    def lock_key(self) -> int:
        """Advisory lock key: a signed 64-bit hash of the schema-qualified index name."""
        digest = hashlib.blake2b(f"{self.schema}.{self.index_name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True)
class IndexParams(_NamedIndex):
    """What index to build, on which column; the parameters are pgvector's ``WITH (...)`` options.

    Built from a collection's settings by :meth:`of`: the sensor, the trigger, validation and the
    registry all name and describe the index through the same object.
    """

    schema: str
    table: str
    index_type: IndexType
    metric: Metric
    m: int
    ef_construction: int
    lists: int | None
    maintenance_work_mem: str
    column: str = "embedding"
    # Triggers serialized by releases before halfvec carry no vector_type: their columns are vector.
    vector_type: VectorType = "vector"
    # "binary": HNSW over binary_quantize(column)::bit(dimension) (bit_hamming_ops); the dimension is
    # needed (and set) only then.
    quantization: Quantization = "none"
    dimension: int | None = None

    @classmethod
    def of(cls, settings: CollectionSettings) -> IndexParams:
        """The index of a collection (its ``store`` table, its ``index`` section)."""
        index = settings.index
        return cls(
            schema=settings.store.schema,
            table=settings.store.table,
            index_type=index.type,
            metric=index.metric,
            m=index.m,
            ef_construction=index.ef_construction,
            lists=index.lists,
            maintenance_work_mem=index.maintenance_work_mem,
            vector_type=settings.store.vector_type,
            quantization=index.quantization,
            dimension=settings.embedding.dimension if index.quantization == "binary" else None,
        )

    def __post_init__(self) -> None:
        for name in (self.schema, self.table, self.column):
            quote_ident(name)
        if self.vector_type not in OPCLASSES:
            raise ValueError(f"vector_type must be one of {tuple(OPCLASSES)}, got {self.vector_type!r}")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        if self.metric not in DISTANCE_OPERATORS:
            raise ValueError(f"metric must be one of {tuple(DISTANCE_OPERATORS)}, got {self.metric!r}")
        if self.index_type == "hnsw":
            _check_hnsw(self.m, self.ef_construction)
        if self.index_type == "ivfflat" and not (self.lists and _within(self.lists, IVFFLAT_LISTS)):
            low, high = IVFFLAT_LISTS
            raise ValueError(
                f"ivfflat needs lists between {low} and {high} (rows/1000 is a good start), got {self.lists}"
            )
        if self.maintenance_work_mem != "auto":
            parse_memory(self.maintenance_work_mem)
        if self.quantization not in ("none", "binary"):
            raise ValueError(f"quantization must be 'none' or 'binary', got {self.quantization!r}")
        if self.quantization == "binary" and (self.index_type != "hnsw" or not self.dimension):
            raise ValueError("binary quantization needs an hnsw index and the vectors' dimension")

    @property
    def params_hash(self) -> str:
        """8 hex digits identifying the parameters that shape the index (type, metric, options)."""
        # Options the index type ignores are left out, so changing them does not rebuild anything.
        hnsw = self.index_type == "hnsw"
        shape: tuple[object, ...] = (
            self.index_type,
            self.metric,
            self.m if hnsw else None,
            self.ef_construction if hnsw else None,
            None if hnsw else self.lists,
        )
        if self.vector_type != "vector":  # names of vector indexes stay what earlier releases built
            shape += (self.vector_type,)
        if self.quantization != "none":
            shape += (self.quantization,)
        return hashlib.sha256(repr(shape).encode()).hexdigest()[:8]

    @property
    def index_name(self) -> str:
        """``<table>_<type>_<params hash>``, at most 63 bytes."""
        return _index_name(self.table, self.index_type, self.params_hash)

    @property
    def opclass(self) -> str:
        """pgvector operator class matching the column's type and the metric (Hamming distance for a
        binary-quantized index)."""
        return (
            "bit_hamming_ops" if self.quantization == "binary" else OPCLASSES[self.vector_type][self.metric]
        )

    @property
    def indexed_expression(self) -> str:
        """What the index holds: the quoted column, or its binary quantization (an expression of the
        quoted column and the validated dimension)."""
        if self.quantization == "binary":
            return f"(binary_quantize({quote_ident(self.column)})::bit({int(self.dimension or 0)}))"
        return quote_ident(self.column)

    def with_options(self) -> str:
        """The ``WITH (...)`` clause (validated integers, so safe to inline in DDL)."""
        if self.index_type == "hnsw":
            return f"WITH (m = {int(self.m)}, ef_construction = {int(self.ef_construction)})"
        return f"WITH (lists = {int(self.lists or 0)})"

    def create_sql(self) -> str:
        """``CREATE INDEX CONCURRENTLY IF NOT EXISTS`` statement for this index."""
        return (
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {quote_ident(self.index_name)} "
            f"ON {self.qualified_table} USING {self.index_type} "
            f"({self.indexed_expression} {self.opclass}) {self.with_options()}"
        )


@dataclass(frozen=True)
class KeywordIndexParams(_NamedIndex):
    """The keyword index: GIN over the table's generated ``tsvector`` column (``content_tsv``),
    which keyword and hybrid searches match ``websearch_to_tsquery`` against."""

    schema: str
    table: str
    maintenance_work_mem: str
    column: str = TEXT_SEARCH_COLUMN
    index_type: ClassVar[str] = "gin"

    @classmethod
    def of(cls, settings: CollectionSettings) -> KeywordIndexParams:
        """The keyword index of a collection."""
        return cls(settings.store.schema, settings.store.table, settings.index.maintenance_work_mem)

    def __post_init__(self) -> None:
        for name in (self.schema, self.table, self.column):
            quote_ident(name)
        if self.maintenance_work_mem != "auto":
            parse_memory(self.maintenance_work_mem)

    @property
    def index_name(self) -> str:
        """``<table>_gin_<hash of the column>``, at most 63 bytes."""
        column_hash = hashlib.sha256(repr((self.index_type, self.column)).encode()).hexdigest()[:8]
        return _index_name(self.table, self.index_type, column_hash)

    def create_sql(self) -> str:
        """``CREATE INDEX CONCURRENTLY IF NOT EXISTS`` statement for this index."""
        return (
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {quote_ident(self.index_name)} "
            f"ON {self.qualified_table} USING gin ({quote_ident(self.column)})"
        )


AnyIndex = IndexParams | KeywordIndexParams


# -- the build ---------------------------------------------------------------------------------


class _Timeout(Exception):
    """The build did not finish in time; the message says what was still going on."""


class _BuildError(Exception):
    """A problem the user must fix (missing table or column); the message says which."""


@dataclass
class _Clock:
    timeout: float
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return max(0.0, self.timeout - self.elapsed())

    def expired(self) -> bool:
        return self.elapsed() >= self.timeout


@dataclass(frozen=True)
class _IndexState:
    oid: int
    table_oid: int
    valid: bool
    builder_pid: int | None  # a backend running CREATE INDEX for it right now


@dataclass(frozen=True)
class _Table:
    oid: int
    dimension: int
    attnum: int


@dataclass
class _Progress:
    """Last progress sample of a build, to derive a rate and the time left."""

    at: float = 0.0
    tuples_done: int = 0


def _describe_progress(row: Any, rate: float, expected_count: int) -> str:
    """Phase and how far it got, e.g. "phase 'building index: loading tuples': 5030 of 20000
    tuples (25.1%), 4409 tuples/s, ~3s left"."""
    phase, done, total, blocks_done, blocks_total, reltuples = row
    # pgvector's HNSW reports tuples_total = 0: measure against the table's row estimate (or, for a
    # table never analysed, reltuples = -1, against the expected count).
    total = total or (int(reltuples) if reltuples > 0 else expected_count)
    if done and total:
        left = f", ~{(total - done) / rate:.0f}s left" if rate > 0 and done < total else ""
        percent = 100 * done / total
        return f"phase {phase!r}: {done} of {total} tuples ({percent:.1f}%), {rate:.0f} tuples/s{left}"
    if blocks_total:
        percent = 100 * blocks_done / blocks_total
        return f"phase {phase!r}: {blocks_done} of {blocks_total} blocks ({percent:.1f}%)"
    return f"phase {phase!r}"


def _params(target: PostgresParams | str) -> PostgresParams:
    return target if isinstance(target, PostgresParams) else PostgresParams.from_dsn(target)


@asynccontextmanager
async def _connect(target: PostgresParams | str, role: str) -> AsyncIterator[Any]:
    params = _params(target)
    try:
        conn = await asyncpg.connect(**params.asyncpg_arguments(f"capstone index {role}"))
    except (asyncpg.PostgresError, OSError) as exc:
        fix = refusal_reason(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError):
            fix = fix or "check the connection's login, password and TLS settings"
        if fix is None:
            raise
        raise PostgresConnectionRefused(
            f"Postgres at {params.describe()} refused the connection: {exc}; {fix}"
        ) from exc
    try:
        yield conn
    except BaseException:
        # Do not wait for a busy server (e.g. the build when the trigger is cancelled): dropping the
        # socket is enough, the server aborts the backend on its next connection check.
        conn.terminate()
        raise
    else:
        await conn.close()


_STATE_SQL = """
SELECT c.oid, i.indrelid, i.indisvalid,
       (SELECT p.pid FROM pg_stat_progress_create_index p WHERE p.index_relid = c.oid LIMIT 1)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_index i ON i.indexrelid = c.oid
WHERE n.nspname = $1 AND c.relname = $2
"""

_TABLE_SQL = """
SELECT c.oid, a.atttypmod, a.attnum
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $3 AND NOT a.attisdropped
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
"""

_PROGRESS_SQL = """
SELECT p.phase, p.tuples_done, p.tuples_total, p.blocks_done, p.blocks_total, t.reltuples
FROM pg_stat_progress_create_index p
JOIN pg_class t ON t.oid = p.relid
WHERE p.pid = $1
"""

# Other ANN indexes on the same single column, except ones being built right now.
_SIBLINGS_SQL = """
SELECT c.relname
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = $1 AND i.indnatts = 1 AND i.indkey[0] = $2 AND c.relname <> $3
  AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.index_relid = c.oid)
"""


@dataclass
class _IndexBuild:
    """One run of the build state machine over a control connection and a lock connection."""

    target: PostgresParams | str
    params: AnyIndex
    expected_count: int
    poll_interval: float
    clock: _Clock
    log: BuildLog
    control: Any
    lock: Any
    progress: _Progress = field(default_factory=_Progress)
    builds_started: int = 0

    @property
    def name(self) -> str:
        return self.params.qualified_index()

    async def run(self) -> IndexEvent:
        """Loop until the index is valid and holds ``expected_count`` vectors, or time runs out."""
        table = await self.table()
        while True:
            state = await self.state()
            self._check_owner(state, table)
            if state is not None and state.valid:
                count = await self.count()
                if count >= self.expected_count:
                    await self.drop_siblings(table)
                    return await self.success(state)
                waiting = f"the index is valid but only {count} of {self.expected_count} rows have embeddings"
            elif state is not None and state.builder_pid is not None:
                waiting = f"following the build run by another backend (pid {state.builder_pid})"
            elif await self._build_if_lock_free(table):
                continue
            else:
                waiting = "another process holds its build lock and has not started building yet"
            if self.clock.expired():
                raise _Timeout(f"index {self.name} was not built within {self.clock.timeout:g}s: {waiting}")
            await self._log_waiting(waiting, state)
            await asyncio.sleep(self._pause())

    async def ready(self) -> IndexEvent | None:
        """The success event when the index is valid and every vector is there, else None."""
        try:
            table = await self.table()
            state = await self.state()
            self._check_owner(state, table)
        except _BuildError:
            return None  # a build reports it, with the same message
        if state is None or not state.valid or await self.count() < self.expected_count:
            return None
        await self.drop_siblings(table)
        return await self.success(state)

    def _check_owner(self, state: _IndexState | None, table: _Table) -> None:
        if state is not None and state.table_oid != table.oid:
            raise _BuildError(
                f"the name of index {self.name} is taken by an index on another table: drop or rename it"
            )

    async def _log_waiting(self, waiting: str, state: _IndexState | None) -> None:
        if state is not None and state.builder_pid is not None:
            await self._log_progress(state.builder_pid, waiting)
        else:
            self.log.info("index %s: %s; checking again in %.1fs", self.name, waiting, self._pause())

    async def _build_if_lock_free(self, table: _Table) -> bool:
        """Build under the advisory lock; False when another process holds it."""
        key = self.params.lock_key
        if not await self.lock.fetchval("SELECT pg_try_advisory_lock($1)", key):
            return False
        try:
            await self._build_locked(table)
        finally:
            await self.lock.execute("SELECT pg_advisory_unlock($1)", key)
        return True

    def _pause(self) -> float:
        return min(self.poll_interval, self.clock.remaining())

    async def _build_locked(self, table: _Table) -> None:
        # Re-read under the lock: a build that held it may have finished or failed meanwhile.
        state = await self.state()
        if state is not None and (state.valid or state.builder_pid is not None):
            return
        if state is not None:
            self.log.warning(
                "index %s is INVALID (left by a failed build): dropping it to rebuild", self.name
            )
            await self._drop(self.params.index_name)
        if self.clock.expired():
            raise _Timeout(f"index {self.name} was not built within {self.clock.timeout:g}s")
        await self._run_own_build(table)

    async def _run_own_build(self, table: _Table) -> None:
        rows = await self.count()
        memory = build_memory(
            rows,
            table.dimension,
            self.params.index_type,
            self.params.maintenance_work_mem,
            _value_bytes(self.params),
        )
        async with _connect(self.target, "build") as build:
            await build.execute(
                "SELECT set_config('maintenance_work_mem', $1, false), "
                "set_config('client_connection_check_interval', $2, false)",
                memory,
                CONNECTION_CHECK_INTERVAL,
            )
            build.add_log_listener(self._relay_notice)
            self.builds_started += 1
            over = (
                f"{rows} rows"
                if self.params.index_type == "gin"
                else f"{rows} vectors of dimension {table.dimension}"
            )
            self.log.info(
                "index %s: building over %s with maintenance_work_mem=%s: %s",
                self.name,
                over,
                memory,
                self.params.create_sql(),
            )
            pid = build.get_server_pid()
            task = asyncio.create_task(build.execute(self.params.create_sql()))
            try:
                await self._watch(task, pid)
            except (_Timeout, asyncpg.PostgresError):
                # Leave nothing behind: a failed CONCURRENTLY build keeps an INVALID index.
                await self._drop_invalid()
                raise
            finally:
                if not task.done():
                    task.cancel()

    async def _watch(self, task: asyncio.Future[Any], pid: int) -> None:
        """Wait for our build, logging progress every poll interval; cancel it on timeout."""
        while True:
            done, _ = await asyncio.wait({task}, timeout=self._pause())
            if done:
                task.result()  # raises the build's error, if any
                self.log.info("index %s: built in %.1fs", self.name, self.clock.elapsed())
                return
            if self.clock.expired():
                await self._cancel(task, pid)
                return  # the build finished just before the cancel landed: it is valid
            await self._log_progress(pid, "building")

    async def _cancel(self, task: asyncio.Future[Any], pid: int) -> None:
        self.log.warning(
            "index %s: timeout of %gs reached, cancelling the build (pid %d)",
            self.name,
            self.clock.timeout,
            pid,
        )
        await self.control.execute("SELECT pg_cancel_backend($1)", pid)
        try:
            await task
        except asyncpg.QueryCanceledError as exc:
            raise _Timeout(
                f"index {self.name} was not built within {self.clock.timeout:g}s: the build was cancelled "
                "and its INVALID index dropped; raise index.build_timeout_seconds or give the build more "
                "maintenance_work_mem"
            ) from exc

    def _relay_notice(self, _conn: Any, message: Any) -> None:
        # pgvector says e.g. "hnsw graph no longer fits into maintenance_work_mem": worth seeing.
        hint = f" ({message.hint})" if getattr(message, "hint", None) else ""
        self.log.warning("index %s: postgres: %s%s", self.name, message.message, hint)

    async def _log_progress(self, pid: int, doing: str) -> None:
        row = await self.control.fetchrow(_PROGRESS_SQL, pid)
        if row is None:
            return  # the build ended between two queries
        now, done = self.clock.elapsed(), row["tuples_done"]
        elapsed = now - self.progress.at
        rate = max(0.0, (done - self.progress.tuples_done) / elapsed) if elapsed > 0 else 0.0
        self.progress = _Progress(at=now, tuples_done=done)
        where = _describe_progress(row, rate, self.expected_count)
        self.log.info("index %s: %s, %s, %.1fs elapsed", self.name, doing, where, now)

    # -- catalog queries ---------------------------------------------------------------------

    async def table(self) -> _Table:
        p = self.params
        row = await self.control.fetchrow(_TABLE_SQL, p.schema, p.table, p.column)
        if row is None:
            raise _BuildError(
                f"table {p.qualified_table} does not exist: the upsert step creates it; check the "
                "collection's store.schema and store.table"
            )
        if row[2] is None:
            raise _BuildError(f"table {p.qualified_table} has no column {quote_ident(p.column)}")
        return _Table(oid=row[0], dimension=row[1], attnum=row[2])

    async def state(self) -> _IndexState | None:
        row = await self.control.fetchrow(_STATE_SQL, self.params.schema, self.params.index_name)
        return None if row is None else _IndexState(*row)

    async def count(self) -> int:
        p = self.params
        sql = f"SELECT count(*) FROM {p.qualified_table} WHERE {quote_ident(p.column)} IS NOT NULL"
        return int(await self.control.fetchval(sql))

    async def _drop(self, name: str) -> None:
        await self.control.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {self.params.qualified_index(name)}")

    async def _drop_invalid(self) -> None:
        state = await self.state()
        if state is not None and not state.valid and state.builder_pid is None:
            await self._drop(self.params.index_name)
            self.log.info("index %s: dropped the INVALID index the failed build left", self.name)

    async def drop_siblings(self, table: _Table) -> None:
        """Drop this column's indexes built for other parameters, now that ours is valid."""
        rows = await self.control.fetch(_SIBLINGS_SQL, table.oid, table.attnum, self.params.index_name)
        for (name,) in rows:
            if is_managed_index_name(name, self.params.table):
                await self._drop(name)
                self.log.info("index %s is valid: dropped %s, built for other parameters", self.name, name)

    async def success(self, state: _IndexState) -> IndexEvent:
        p = self.params
        row = await self.control.fetchrow(
            f"SELECT count({quote_ident(p.column)}), pg_relation_size($1::oid), "
            "(extract(epoch FROM clock_timestamp() - max(updated_at)) * 1000)::float8 "
            f"FROM {p.qualified_table}",
            state.oid,
        )
        count, size, freshness = row
        duration = self.clock.elapsed()
        self.log.info(
            "index %s is valid: %d vectors, %d bytes, ready after %.1fs", self.name, count, size, duration
        )
        return {
            "status": "success",
            "index_name": p.index_name,
            "indexed_count": int(count),
            "index_size_bytes": int(size),
            "duration_s": round(duration, 3),
            "freshness_ms": None if freshness is None else round(freshness),
            "builds_started": self.builds_started,
        }


async def build_index(
    target: PostgresParams | str,
    params: IndexParams,
    expected_count: int,
    poll_interval: float,
    timeout: float,
    log: BuildLog,
    keyword: KeywordIndexParams | None = None,
) -> IndexEvent:
    """Make the ANN index described by ``params`` (and the ``keyword`` index, first, when given)
    valid over ``expected_count`` rows; return the event. ``timeout`` covers both.

    ``target`` is the Postgres (typed, or a libpq URI / conninfo string). The event is
    ``{"status": "success", "indexed_count", "index_name", "index_size_bytes", "duration_s",
    "freshness_ms", "builds_started"}`` (with ``keyword_index_name`` and ``keyword_index_size_bytes``
    when a keyword index was built) or ``{"status": "timeout" | "error", "message", "terminal"}``;
    ``terminal`` says a retry cannot help (a refused login, a name taken by another table's index).
    """
    clock = _Clock(timeout)
    current: AnyIndex = keyword or params
    try:
        async with _connect(target, "control") as control, _connect(target, "lock") as lock:
            keyword_event = None
            if keyword is not None and await _keyword_column_exists(control, keyword, log):
                build = _IndexBuild(target, keyword, expected_count, poll_interval, clock, log, control, lock)
                keyword_event = await build.run()
            current = params
            build = _IndexBuild(target, params, expected_count, poll_interval, clock, log, control, lock)
            return _with_keyword(await build.run(), keyword_event)
    except _Timeout as exc:
        log.warning("%s", exc)
        return {"status": "timeout", "message": str(exc), "terminal": False}
    except (
        _BuildError,
        PostgresConnectionRefused,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
    ) as exc:
        message = f"index {current.qualified_index()} on {current.qualified_table} could not be built: {exc}"
        log.warning("%s", message)
        terminal = isinstance(exc, _BuildError) or is_terminal(exc)
        return {"status": "error", "message": message, "terminal": terminal}


async def _keyword_column_exists(control: Any, keyword: KeywordIndexParams, log: BuildLog) -> bool:
    """Whether the keyword index's column exists. A table without it is one the run's earlier tasks
    wrote before capstone was upgraded (the next run adds the column): the ANN index is built all
    the same."""
    found = await control.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND NOT a.attisdropped)",
        keyword.schema,
        keyword.table,
        keyword.column,
    )
    if not found:
        log.warning(
            "table %s has no column %s yet (its next run adds it): building only the vector index",
            keyword.qualified_table,
            quote_ident(keyword.column),
        )
    return bool(found)


def _with_keyword(event: IndexEvent, keyword: IndexEvent | None) -> IndexEvent:
    """The ANN index's success event, with the keyword index's name, size and builds."""
    if keyword is None:
        return event
    return {
        **event,
        "keyword_index_name": keyword["index_name"],
        "keyword_index_size_bytes": keyword["index_size_bytes"],
        "builds_started": event["builds_started"] + keyword["builds_started"],
    }


async def check_index(
    target: PostgresParams | str,
    params: IndexParams,
    expected_count: int,
    log: BuildLog,
    keyword: KeywordIndexParams | None = None,
) -> IndexEvent | None:
    """The success event if the index (and the ``keyword`` index, when given) is already valid over
    ``expected_count`` rows, else None."""
    async with _connect(target, "check") as control:
        keyword_event = None
        if keyword is not None and await _keyword_column_exists(control, keyword, log):
            build = _IndexBuild(target, keyword, expected_count, 0.0, _Clock(0.0), log, control, lock=None)
            keyword_event = await build.ready()
            if keyword_event is None:
                return None
        build = _IndexBuild(target, params, expected_count, 0.0, _Clock(0.0), log, control, lock=None)
        event = await build.ready()
        return None if event is None else _with_keyword(event, keyword_event)

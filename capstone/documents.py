"""Enriched documents: where a batch lives, how it is read, and which documents are fit to index.

An upstream pipeline announces a batch by emitting its Asset with an event ``extra`` that says
where the batch is (a :class:`BatchLocation`):

* ``{"format": "jsonl", "path": "/data/batch-0001.jsonl"}`` - one JSON document per line. The path
  may be an object storage URI read through Airflow's ``ObjectStoragePath`` (``s3://bucket/key``,
  ``gs://...``, ``file://...``), with the storage connection in ``"conn_id"`` (say
  ``"aws_default"``; without it the filesystem's own credential chain, such as an IAM role). A
  batch is read as a stream, in blocks of :data:`READ_BLOCK_BYTES`: memory stays flat whatever its
  size. The worker needs the filesystem's provider (``apache-airflow-providers-amazon[s3fs]`` for
  ``s3://``: the project's ``[s3]`` extra);
* ``{"format": "postgres", "table": "staging.enriched_documents", "batch_id": "0001",
  "connection_id": "vector_store_default"}`` - rows ``(batch_id, id, content, chunks jsonb,
  metadata jsonb)``.

A document is ``{"id": str, "content": str, "chunks": [str, ...], "metadata": {...}}``; without
``chunks`` (or with ``null``), its ``content`` is chunked as the collection's ``chunking`` section
says (:mod:`capstone.chunking`). A bad
document is set aside with its reason; it never stops the others. ``{"id": str, "deleted": true}``
is a tombstone: the document was deleted upstream, and every chunk of it leaves the collection
(in a Postgres batch table, a boolean ``deleted`` column, when the table has one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from capstone.contracts import Rejection
from capstone.errors import TerminalError
from capstone.settings import DEFAULT_CONNECTION_ID

__all__ = [
    "DUPLICATE_REASON",
    "BatchLocation",
    "BatchNotFound",
    "BatchUnreadable",
    "EnrichedDocument",
    "InvalidBatchLocation",
    "RejectedDocument",
    "read_batch",
    "validate_documents",
]

_TABLE = re.compile(r"^(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$")
_DOCUMENT_ID = re.compile(r"^[^\x00-\x1f]{1,200}$")
_URI = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://", re.IGNORECASE)

# A batch is read in blocks of this size (and object storage fetches ranges of it): memory per
# task stays flat in the batch's size.
READ_BLOCK_BYTES = 1 << 20
# What a storage connection looks like, for the "define it" hint (keyed by URI scheme).
_STORAGE_CONNECTION_EXAMPLES = {
    "s3": "aws://ACCESS_KEY_ID:SECRET_ACCESS_KEY@/?region_name=REGION",
    "gs": "google-cloud-platform://?key_path=%2Fsecrets%2Fkey.json",
    "abfs": "wasb://ACCOUNT:KEY@",
}
_STORAGE_PROVIDERS = {
    "s3": "apache-airflow-providers-amazon[s3fs] (the project's [s3] extra)",
    "gs": "apache-airflow-providers-google",
    "gcs": "apache-airflow-providers-google",
    "abfs": "apache-airflow-providers-microsoft-azure",
}


# Why the older copy of a document id seen twice in a run is set aside (the newest batch wins).
DUPLICATE_REASON = "duplicate document id in this batch"


class InvalidBatchLocation(TerminalError, ValueError):
    """An asset event (or a run's conf) names a batch in a way that cannot be read."""


class BatchNotFound(TerminalError, FileNotFoundError):
    """The batch an asset event names does not exist (any more)."""


class BatchUnreadable(TerminalError, PermissionError):
    """The batch exists, but the credentials this task reads it with are not allowed to."""


@dataclass(frozen=True)
class BatchLocation:
    """Where one batch of enriched documents can be read from (an asset event's ``extra``)."""

    format: str
    path: str | None = None
    table: str | None = None
    batch_id: str | None = None
    connection_id: str = DEFAULT_CONNECTION_ID
    storage_conn_id: str | None = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> BatchLocation:
        """Parse an event extra; raises :class:`InvalidBatchLocation` naming what is missing."""
        fmt = str(extra.get("format") or ("jsonl" if extra.get("path") else ""))
        if fmt == "jsonl":
            if not extra.get("path"):
                raise InvalidBatchLocation("a jsonl batch needs 'path' in the asset event extra")
            conn_id = str(extra.get("conn_id") or "") or None
            return cls(format="jsonl", path=str(extra["path"]), storage_conn_id=conn_id)
        if fmt == "postgres":
            table, batch_id = extra.get("table"), extra.get("batch_id")
            if not table or batch_id is None:
                raise InvalidBatchLocation(
                    "a postgres batch needs 'table' and 'batch_id' in the asset event extra"
                )
            if not _TABLE.fullmatch(str(table)):
                raise InvalidBatchLocation(
                    f"'table' must be 'schema.table' of plain identifiers, got {table!r}"
                )
            return cls(
                format="postgres",
                table=str(table),
                batch_id=str(batch_id),
                connection_id=str(extra.get("connection_id") or DEFAULT_CONNECTION_ID),
            )
        raise InvalidBatchLocation(f"unknown batch format {fmt!r}: use 'jsonl' (with 'path') or 'postgres'")

    def describe(self) -> str:
        if self.format == "jsonl":
            return str(self.path) + (f" (connection {self.storage_conn_id})" if self.storage_conn_id else "")
        return f"{self.table} batch {self.batch_id}"


@dataclass
class EnrichedDocument:
    """A document ready to index: its chunks are non-empty strings.

    With ``deleted``, a tombstone: no content or chunks, and the collection drops all it holds of
    the document.
    """

    id: str
    content: str
    chunks: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    deleted: bool = False

    @classmethod
    def tombstone(cls, document_id: str) -> EnrichedDocument:
        """The document ``document_id``, deleted upstream."""
        return cls(id=document_id, content="", chunks=[], deleted=True)


@dataclass(frozen=True)
class RejectedDocument:
    """A document set aside, and why."""

    id: str | None
    source: str
    reason: str

    def as_dict(self) -> Rejection:
        return {"id": self.id, "source": self.source, "reason": self.reason}


def read_batch(location: BatchLocation) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, raw_document)`` for every record of the batch; ``where`` names file:line."""
    if location.format == "jsonl":
        yield from _read_jsonl(location)
    else:
        yield from _read_postgres(location)


def _read_jsonl(location: BatchLocation) -> Iterator[tuple[str, Any]]:
    name = (location.path or "").rstrip("/").rsplit("/", 1)[-1]
    with _open_batch(location) as handle:
        for number, raw_line in enumerate(_lines(handle), start=1):
            where = f"{name}:{number}"
            if not raw_line.strip():
                continue
            try:
                yield where, json.loads(raw_line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield where, _Unreadable(f"invalid UTF-8 at byte {exc.start}")
            except json.JSONDecodeError as exc:
                yield where, _Unreadable(f"invalid JSON: {exc.msg} at column {exc.colno}")


def _lines(handle: BinaryIO) -> Iterator[bytes]:
    """The lines of ``handle``, read in blocks (object storage files iterate slowly line by line)."""
    tail = b""
    while block := handle.read(READ_BLOCK_BYTES):
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


def _open_batch(location: BatchLocation) -> BinaryIO:
    """Open a jsonl batch: a local path directly, a URI through ``ObjectStoragePath``."""
    uri = location.path or ""
    match = _URI.match(uri)
    if match is None:
        path = Path(uri)
        if not path.is_file():
            raise BatchNotFound(
                f"batch file {path} does not exist where this task runs (named by the asset event): "
                "check the path the upstream pipeline sent, and that every worker can read it (workers "
                "on other hosts share no disk: send batches through object storage, s3://...)"
            )
        return path.open("rb")
    return _open_object(uri, match["scheme"].lower(), location.storage_conn_id)


def _open_object(uri: str, scheme: str, conn_id: str | None) -> BinaryIO:
    from airflow.sdk import ObjectStoragePath

    from capstone.connections import airflow_connection

    if conn_id:
        example = _STORAGE_CONNECTION_EXAMPLES.get(scheme, f"{scheme}://...")
        airflow_connection(conn_id, example_uri=example)
    used = f"connection {conn_id!r}" if conn_id else "the filesystem's default credentials (no conn_id)"
    try:
        path = ObjectStoragePath(uri, conn_id=conn_id)
        return path.open("rb", block_size=READ_BLOCK_BYTES, cache_type="none")
    except FileNotFoundError as exc:
        raise BatchNotFound(
            f"batch {uri} does not exist ({exc}; read with {used}, named by the asset event): check the "
            "bucket and key the upstream pipeline sent, and the connection's endpoint"
        ) from None
    except PermissionError as exc:
        raise BatchUnreadable(
            f"batch {uri} cannot be read with {used}: {exc}. Grant read access to the batch "
            "(s3:GetObject on the key, s3:ListBucket on the bucket) or name another connection"
        ) from None
    except (ValueError, ImportError) as exc:
        if "filesystem" not in str(exc).lower() and "install" not in str(exc).lower():
            raise
        provider = _STORAGE_PROVIDERS.get(scheme, f"the Airflow provider for {scheme}://")
        raise InvalidBatchLocation(
            f"batch {uri}: no filesystem for {scheme}:// is installed where this task runs ({exc}); "
            f"install {provider} in every worker image"
        ) from None


def _read_postgres(location: BatchLocation) -> Iterator[tuple[str, Any]]:
    import psycopg
    from psycopg import sql

    from capstone.connections import connect, postgres_params

    schema, _, table = (location.table or "").rpartition(".")
    name = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    params = postgres_params(location.connection_id)
    with connect(params, application_name="capstone load", autocommit=False) as conn:
        try:
            columns = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(name)).description or []
        except psycopg.errors.UndefinedTable:
            raise BatchNotFound(
                f"batch table {location.table} does not exist in {params.describe()} (named by the asset "
                "event): check the table the upstream pipeline sent"
            ) from None
        deleted = sql.SQL("deleted" if "deleted" in {column.name for column in columns} else "NULL")
        query = sql.SQL(
            "SELECT id, content, chunks, metadata, {} FROM {} WHERE batch_id = %s ORDER BY id"
        ).format(deleted, name)
        with conn.cursor(name="batch") as cur:
            cur.itersize = 2000
            cur.execute(query, (location.batch_id,))
            for doc_id, content, chunks, metadata, is_deleted in cur:
                yield (
                    f"{location.table}:{doc_id}",
                    {
                        "id": doc_id,
                        "content": content,
                        "chunks": chunks,
                        "metadata": metadata,
                        "deleted": is_deleted,
                    },
                )


@dataclass(frozen=True)
class _Unreadable:
    reason: str


def validate_documents(
    records: Iterable[tuple[str, Any]],
    *,
    max_chunk_chars: int,
    max_chunks: int,
    split: Callable[[str], list[str]] | None = None,
) -> Iterator[EnrichedDocument | RejectedDocument]:
    """Check each record; yield a document to index or a rejection with its reason.

    A record without ``chunks`` (absent or null) has its ``content`` cut by ``split`` (the
    collection's :class:`~capstone.chunking.Chunker`); without ``split`` it is rejected. A later
    record with an id seen before is rejected (the first one wins), so one batch never writes two
    versions of a document.
    """
    seen: set[str] = set()
    for where, raw in records:
        result = _check(where, raw, max_chunk_chars=max_chunk_chars, max_chunks=max_chunks, split=split)
        if isinstance(result, EnrichedDocument):
            if result.id in seen:
                yield RejectedDocument(result.id, where, DUPLICATE_REASON)
                continue
            seen.add(result.id)
        yield result


def _check(
    where: str,
    raw: Any,
    *,
    max_chunk_chars: int,
    max_chunks: int,
    split: Callable[[str], list[str]] | None,
) -> EnrichedDocument | RejectedDocument:
    if isinstance(raw, _Unreadable):
        return RejectedDocument(None, where, raw.reason)
    if not isinstance(raw, dict):
        return RejectedDocument(None, where, f"a document must be a JSON object, got {type(raw).__name__}")
    doc_id = raw.get("id")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not _DOCUMENT_ID.fullmatch(doc_id) or not _encodable(doc_id):
        return RejectedDocument(
            None, where, "missing or invalid 'id' (a string of 1-200 printable characters)"
        )
    deleted = raw.get("deleted", False)
    if deleted is None:  # a nullable column of a Postgres batch table
        deleted = False
    if not isinstance(deleted, bool):
        return RejectedDocument(doc_id, where, f"'deleted' must be true or false, got {deleted!r}")
    if deleted:
        return EnrichedDocument.tombstone(doc_id)
    content, chunks = raw.get("content"), raw.get("chunks")
    reason = _content_problem(content)
    if reason is None and chunks is None and split is not None:
        chunks = split(str(content))
        if not chunks:
            reason = "'content' holds no text to chunk"
    if reason is None:
        reason = _chunk_problem(chunks, max_chunk_chars, max_chunks)
    metadata = raw.get("metadata")
    if metadata is None:  # not `or {}`: metadata of [], "" or false is an error, not "no metadata"
        metadata = {}
    if reason is None and not isinstance(metadata, dict):
        reason = "'metadata' must be a JSON object"
    if reason is None:
        reason = _metadata_problem(metadata)
    if reason is not None:
        return RejectedDocument(doc_id, where, reason)
    return EnrichedDocument(id=doc_id, content=str(content), chunks=list(chunks or ()), metadata=metadata)


def _content_problem(content: Any) -> str | None:
    if not isinstance(content, str) or not content.strip():
        return "'content' is missing or empty"
    if "\x00" in content:
        return "'content' contains NUL bytes"
    if not _encodable(content):
        return f"'content' is not valid Unicode {_SURROGATE_HINT}"
    return None


def _chunk_problem(chunks: Any, max_chunk_chars: int, max_chunks: int) -> str | None:
    if not isinstance(chunks, list) or not chunks:
        return "'chunks' must be a non-empty list of strings (or left out, to chunk 'content')"
    if len(chunks) > max_chunks:
        return f"{len(chunks)} chunks is more than chunking.max_chunks_per_document ({max_chunks})"
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, str):
            return f"chunk {index} is a {type(chunk).__name__}, not a string"
        if not chunk.strip():
            return f"chunk {index} is empty"
        if "\x00" in chunk:
            return f"chunk {index} contains NUL bytes"
        if not _encodable(chunk):
            return f"chunk {index} is not valid Unicode {_SURROGATE_HINT}"
        if len(chunk) > max_chunk_chars:
            return (
                f"chunk {index} has {len(chunk)} characters, more than the limit of {max_chunk_chars} "
                "(chunking.max_chunk_chars or the model's input limit): split it upstream, or leave 'chunks' "
                "out to have 'content' chunked"
            )
    return None


def _metadata_problem(metadata: dict[str, Any]) -> str | None:
    try:
        text = json.dumps(metadata, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        return f"'metadata' is not JSON-serialisable: {exc}"
    if "\\u0000" in text:
        return "'metadata' contains NUL characters (Postgres jsonb cannot store them)"
    if not _encodable(text):
        return f"'metadata' is not valid Unicode {_SURROGATE_HINT}"
    return None


# JSON may escape half of a UTF-16 surrogate pair ("\\ud800"); Python decodes it to a string that no
# UTF-8 database can store, and one such document would fail the whole batch's COPY.
_SURROGATE_HINT = "(a lone UTF-16 surrogate such as \\ud800, from a bad \\u escape): fix the text upstream"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

"""The rows a collection table must hold, compared exactly: ids, texts, metadata and vectors."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone.embeddings.hashing import HashEmbedder
from capstone.settings import CollectionSettings
from capstone.store import stored_vector

__all__ = [
    "StoredChunk",
    "assert_mirrors_the_table",
    "assert_table_holds_exactly",
    "drop_test_schema",
    "expected_chunks",
    "jsonl_batch",
    "stored_chunks",
    "table_documents",
]


@dataclass(frozen=True)
class StoredChunk:
    """One row of a collection table, as the tests compare it."""

    document_id: str
    chunk_index: int
    content: str
    metadata: dict[str, Any]
    embedding_model: str


def stored_chunks(dsn: str, schema: str, table: str) -> tuple[dict[str, StoredChunk], dict[str, np.ndarray]]:
    """Every row of the table by id, and its vector (rows without a vector have none)."""
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        rows = conn.execute(
            sql.SQL(
                "SELECT id, document_id, chunk_index, content, metadata, embedding_model, embedding FROM {}"
            ).format(sql.Identifier(schema, table))
        ).fetchall()
    chunks = {row[0]: StoredChunk(*row[1:6]) for row in rows}
    assert len(chunks) == len(rows), "duplicate ids in the collection table"
    vectors = {row[0]: stored_vector(row[6]) for row in rows if row[6] is not None}
    return chunks, vectors


def expected_chunks(documents: Sequence[dict[str, Any]], model: str) -> dict[str, StoredChunk]:
    """The rows the pipeline must store for ``documents`` (all valid, ids unique)."""
    return {
        f"{doc['id']}_chunk_{index}": StoredChunk(doc["id"], index, text, doc.get("metadata") or {}, model)
        for doc in documents
        for index, text in enumerate(doc["chunks"])
    }


def assert_table_holds_exactly(
    dsn: str,
    schema: str,
    table: str,
    documents: Sequence[dict[str, Any]],
    *,
    model: str,
    dimension: int,
    missing: Collection[str] = (),
) -> None:
    """The table holds one row per chunk of ``documents`` (but the ``missing`` chunk ids) and
    nothing else, each with its own vector.

    The hash embedder (also behind the fake OpenAI server) is deterministic, so every stored vector
    is compared with the vector of its own text: a vector written under another chunk's id fails.
    """
    chunks, vectors = stored_chunks(dsn, schema, table)
    expected = {i: chunk for i, chunk in expected_chunks(documents, model).items() if i not in missing}
    assert sorted(chunks) == sorted(expected)
    assert chunks == expected
    assert sorted(vectors) == sorted(expected), "rows without a vector"
    ids = sorted(expected)
    want = HashEmbedder(dimension=dimension).embed([expected[i].content for i in ids])
    got = np.stack([vectors[i] for i in ids])
    np.testing.assert_allclose(got, want, atol=1e-6)


def jsonl_batch(path: Path, lines: Sequence[bytes | dict[str, Any]]) -> dict[str, Any]:
    """Write a JSONL batch (dicts as JSON, bytes verbatim) and return its asset event extra."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for line in lines:
            data = line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()
            handle.write(data + b"\n")
    return {"format": "jsonl", "path": str(path)}


def drop_test_schema(dsn: str, schema: str) -> None:
    """Drop a test's schema with everything in it, and its rows in the registry and the version
    catalog (where those exist: a test that failed early may never have created them)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        for catalog in ("capstone.collections", "capstone.collection_versions"):
            if conn.execute("SELECT to_regclass(%s)", (catalog,)).fetchone() != (None,):
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE schema_name = %s").format(
                        sql.Identifier(*catalog.split("."))
                    ),
                    (schema,),
                )


def table_documents(dsn: str, table: sql.Identifier, settings: CollectionSettings) -> list[dict[str, Any]]:
    """The documents a collection following ``table`` (``id, body, title``) must hold: one per row
    with text, chunked as its spec says, ``title`` as metadata."""
    from capstone.chunking import Chunker

    chunker = Chunker(settings.chunking, settings.embedding)
    with psycopg.connect(dsn) as conn:
        query = sql.SQL("SELECT id::text, body, title FROM {} ORDER BY id").format(table)
        rows = conn.execute(query).fetchall()
    return [
        {"id": doc_id, "content": body, "chunks": chunker.split(body), "metadata": {"title": title}}
        for doc_id, body, title in rows
        if body and body.strip()
    ]


def assert_mirrors_the_table(
    dsn: str, schema: str, collection_table: str, source_table: sql.Identifier, settings: CollectionSettings
) -> None:
    """The collection (``schema.collection_table``, embedded by ``hash``) holds exactly the documents
    of ``source_table`` (:func:`table_documents`)."""
    expected = table_documents(dsn, source_table, settings)
    dimension = settings.embedding.dimension
    assert_table_holds_exactly(dsn, schema, collection_table, expected, model="hash-v1", dimension=dimension)

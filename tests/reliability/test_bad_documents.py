"""Bad documents through ``dag.test()``: each is set aside with its reason, every valid one is indexed.

One run reads two batches, a JSONL file and a Postgres table, holding valid documents and every
kind of bad one an enrichment step can emit. The run must succeed, the load task's XCom must list
each rejection with its reason, and the collection table must hold exactly the valid documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.support.airflow import asset_events, run_collection, task_states, write_collection, xcom_value
from tests.support.tables import assert_table_holds_exactly, jsonl_batch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]

MAX_CHUNK_CHARS = 200
MAX_CHUNKS = 5


def _valid(doc_id: str, chunks: int = 2, **metadata: Any) -> dict[str, Any]:
    return {
        "id": doc_id,
        "content": f"the full text of {doc_id}",
        "chunks": [f"{doc_id} part {i}: indexing survives bad neighbours" for i in range(chunks)],
        "metadata": {"source": "reliability", **metadata},
    }


VALID_JSONL = [
    _valid("good-1"),
    _valid("7"),
    _valid("good-2", chunks=MAX_CHUNKS),  # exactly at the chunk-count limit
    _valid("good-3", title="Ünïcödé ✓", tags=["a", "b"], nested={"deep": [1, None, True]}),
    _valid("good-4"),
    {**_valid("good-5", chunks=1), "chunks": ["x" * MAX_CHUNK_CHARS]},  # exactly at the length limit
    {**_valid("good-6"), "metadata": None},  # no metadata at all: stored as {}
]

# (JSONL line, the id the rejection names, a piece of its reason)
BAD_JSONL: list[tuple[bytes | dict[str, Any], str | None, str]] = [
    ({"content": "no id", "chunks": ["x"]}, None, "missing or invalid 'id'"),
    ({"id": "", "content": "empty id", "chunks": ["x"]}, None, "missing or invalid 'id'"),
    ({"id": "line\nbreak", "content": "x", "chunks": ["x"]}, None, "missing or invalid 'id'"),
    ({"id": ["list"], "content": "x", "chunks": ["x"]}, None, "missing or invalid 'id'"),
    (
        {"id": "empty-content", "content": "", "chunks": ["x"]},
        "empty-content",
        "'content' is missing or empty",
    ),
    ({"id": "blank-content", "content": " \n", "chunks": ["x"]}, "blank-content", "'content' is missing"),
    ({"id": "no-content", "chunks": ["x"]}, "no-content", "'content' is missing or empty"),
    (
        {"id": "int-chunk", "content": "x", "chunks": ["fine", 42]},
        "int-chunk",
        "chunk 1 is a int, not a string",
    ),
    ({"id": "null-chunk", "content": "x", "chunks": [None]}, "null-chunk", "chunk 0 is a NoneType"),
    ({"id": "dict-chunk", "content": "x", "chunks": [{"t": "x"}]}, "dict-chunk", "chunk 0 is a dict"),
    (
        {"id": "text-chunks", "content": "x", "chunks": "one"},
        "text-chunks",
        "'chunks' must be a non-empty list",
    ),
    ({"id": "no-chunks", "content": "x", "chunks": []}, "no-chunks", "'chunks' must be a non-empty list"),
    ({"id": "blank-chunk", "content": "x", "chunks": ["ok", "  "]}, "blank-chunk", "chunk 1 is empty"),
    (
        {"id": "too-many", "content": "x", "chunks": ["c"] * (MAX_CHUNKS + 1)},
        "too-many",
        f"{MAX_CHUNKS + 1} chunks is more than chunking.max_chunks_per_document ({MAX_CHUNKS})",
    ),
    (
        {"id": "too-long", "content": "x", "chunks": ["ok", "y" * (MAX_CHUNK_CHARS + 1)]},
        "too-long",
        f"chunk 1 has {MAX_CHUNK_CHARS + 1} characters, more than the limit of {MAX_CHUNK_CHARS}",
    ),
    (b'{"id": "latin-1", "content": "caf\xe9", "chunks": ["caf\xe9"]}', None, "invalid UTF-8 at byte"),
    (b'{"id": "cut-short", "content": "x", "chu', None, "invalid JSON"),
    (b"[1, 2, 3]", None, "a document must be a JSON object, got list"),
    (b'"just a string"', None, "a document must be a JSON object, got str"),
    ({"id": "nul-chunk", "content": "x", "chunks": ["a\x00b"]}, "nul-chunk", "chunk 0 contains NUL bytes"),
    ({"id": "nul-content", "content": "a\x00b", "chunks": ["x"]}, "nul-content", "'content' contains NUL"),
    (
        {"id": "nul-metadata", "content": "x", "chunks": ["x"], "metadata": {"k": "a\x00b"}},
        "nul-metadata",
        "'metadata' contains NUL characters",
    ),
    # Python's json reads NaN and Infinity; Postgres jsonb cannot store them.
    (
        b'{"id": "nan-metadata", "content": "x", "chunks": ["x"], "metadata": {"score": NaN}}',
        "nan-metadata",
        "'metadata' is not JSON-serialisable",
    ),
    (
        b'{"id": "inf-metadata", "content": "x", "chunks": ["x"], "metadata": {"score": -Infinity}}',
        "inf-metadata",
        "'metadata' is not JSON-serialisable",
    ),
    (
        {"id": "text-metadata", "content": "x", "chunks": ["x"], "metadata": "tags"},
        "text-metadata",
        "JSON object",
    ),
    (
        {"id": "list-metadata", "content": "x", "chunks": ["x"], "metadata": []},
        "list-metadata",
        "JSON object",
    ),
    ({"id": "zero-metadata", "content": "x", "chunks": ["x"], "metadata": 0}, "zero-metadata", "JSON object"),
    # Valid UTF-8 bytes, but the JSON escapes decode to lone UTF-16 surrogates, which no UTF-8
    # database can store.
    (
        b'{"id": "surrogate-chunk", "content": "x", "chunks": ["a \\ud800 b"]}',
        "surrogate-chunk",
        "chunk 0 is not valid Unicode",
    ),
    (
        b'{"id": "surrogate-metadata", "content": "x", "chunks": ["x"], "metadata": {"k": "\\udc00"}}',
        "surrogate-metadata",
        "'metadata' is not valid Unicode",
    ),
    (b'{"id": "surrogate-\\ud83d", "content": "x", "chunks": ["x"]}', None, "missing or invalid 'id'"),
    # The first document with an id wins; a later one in the same run is set aside.
    ({**_valid("good-1"), "content": "second version"}, "good-1", "duplicate document id"),
    ({**_valid("7"), "id": 7}, "7", "duplicate document id"),
]

VALID_TABLE = [
    _valid(
        "pg-good-1",
        odd={"big": 12345678901234567890, "tiny": 1e-7, "neg": -0.5, "empty": {}, "list": [[], [{}]]},
    ),
    _valid("pg-good-2", emoji="🧭", quote='he said "hi"; DROP TABLE x; --'),
    {**_valid("pg-good-3"), "metadata": None},
    # Sent whole (NULL chunks): chunked by the collection's spec, one chunk as short as this.
    {
        "id": "pg-whole",
        "content": "pg-whole arrives unchunked",
        "chunks": ["pg-whole arrives unchunked"],
        "metadata": {},
    },
]
# Rows of VALID_TABLE written with NULL chunks.
WHOLE = {"pg-whole"}

# (id, content, chunks, metadata) rows of the Postgres batch, the id rejected and the reason
BAD_TABLE: list[tuple[tuple[Any, Any, Any, Any], str | None, str]] = [
    ((None, "x", ["x"], {}), None, "missing or invalid 'id'"),
    (("pg-null-content", None, ["x"], {}), "pg-null-content", "'content' is missing or empty"),
    (("pg-null-chunks", " ", None, {}), "pg-null-chunks", "'content' is missing or empty"),
    (("pg-object-chunks", "x", {"0": "x"}, {}), "pg-object-chunks", "'chunks' must be a non-empty list"),
    (("pg-number-chunk", "x", ["x", 1.5], {}), "pg-number-chunk", "chunk 1 is a float"),
    (("pg-list-metadata", "x", ["x"], [1, 2]), "pg-list-metadata", "'metadata' must be a JSON object"),
    (("pg-text-metadata", "x", ["x"], "tags"), "pg-text-metadata", "'metadata' must be a JSON object"),
    (("pg-false-metadata", "x", ["x"], False), "pg-false-metadata", "'metadata' must be a JSON object"),
    (("good-4", "x", ["x"], {}), "good-4", "duplicate document id"),  # already in the JSONL batch
]


def _postgres_batch(dsn: str, schema: str) -> dict[str, Any]:
    """The enrichment step's Postgres table, holding one batch: valid rows and bad ones."""
    table = sql.Identifier(schema, "enriched")
    rows = [
        (d["id"], d["content"], None if d["id"] in WHOLE else d["chunks"], d["metadata"]) for d in VALID_TABLE
    ]
    rows += [row for row, _id, _reason in BAD_TABLE]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (batch_id text, id text, content text, chunks jsonb, metadata jsonb)"
            ).format(table)
        )
        for doc_id, content, chunks, metadata in rows:
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES ('b1', %s, %s, %s, %s)").format(table),
                (doc_id, content, _jsonb(chunks), _jsonb(metadata)),
            )
        # Another batch in the same table: must not be read.
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES ('b2', 'other-batch', 'x', '[\"x\"]', '{{}}')").format(table)
        )
    return {"format": "postgres", "table": f"{schema}.enriched", "batch_id": "b1"}


def _id_order(rejection: tuple[str | None, str]) -> tuple[bool, str]:
    return rejection[0] is None, rejection[0] or ""


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


def test_every_bad_document_is_set_aside_with_its_reason_and_every_valid_one_indexed(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    jsonl = jsonl_batch(
        tmp_path / "batch.jsonl", [*VALID_JSONL[:3], *(line for line, _, _ in BAD_JSONL), *VALID_JSONL[3:]]
    )
    spec = write_collection(
        tmp_path / "configs",
        "bad_docs",
        pg_schema,
        chunking={"max_chunk_chars": MAX_CHUNK_CHARS, "max_chunks_per_document": MAX_CHUNKS},
        # Mostly bad on purpose: the guard on such batches is tested in test_guards.py.
        source={"max_rejected_fraction": 1.0},
    )

    run = run_collection(spec, [jsonl, _postgres_batch(pg_dsn, pg_schema)])

    states = task_states("bad_docs", run.run_id)
    assert str(run.state) == "success", states
    loaded = xcom_value("bad_docs", run.run_id, "load_enriched_documents")
    expected_rejections = len(BAD_JSONL) + len(BAD_TABLE)
    assert loaded["rejected_count"] == expected_rejections
    assert len(loaded["rejected"]) == expected_rejections  # under the listing cap: all listed
    assert loaded["documents"] == len(VALID_JSONL) + len(VALID_TABLE)
    # JSONL rejections come in line order, the table's in id order (NULL last).
    actual = [(item["id"], item["reason"]) for item in loaded["rejected"]]
    expected = [(doc_id, reason) for _, doc_id, reason in BAD_JSONL]
    expected += sorted(((doc_id, reason) for _, doc_id, reason in BAD_TABLE), key=_id_order)
    for (want_id, want_reason), (got_id, got_reason) in zip(expected, actual, strict=True):
        assert got_id == want_id and want_reason in got_reason, (got_id, got_reason)
    sources = [item["source"] for item in loaded["rejected"]]
    assert sources[: len(BAD_JSONL)] == [f"batch.jsonl:{n}" for n in range(4, 4 + len(BAD_JSONL))]
    assert all(source.startswith(f"{pg_schema}.enriched:") for source in sources[len(BAD_JSONL) :])
    assert all(item["reason"] for item in loaded["rejected"])

    # Stored exactly: the valid documents, the first version of a duplicated id, nothing else.
    assert_table_holds_exactly(
        pg_dsn, pg_schema, "bad_docs", VALID_JSONL + VALID_TABLE, model="hash-v1", dimension=64
    )
    (event,) = asset_events("bad_docs.indexed")[-1:]
    assert event["rejected_documents"] == expected_rejections
    assert event["vector_count"] == sum(len(doc["chunks"]) for doc in VALID_JSONL + VALID_TABLE)
    json.dumps(loaded)  # the report itself is plain JSON

"""Reading enriched-document batches and setting bad documents aside with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capstone.documents import (
    BatchLocation,
    EnrichedDocument,
    RejectedDocument,
    read_batch,
    validate_documents,
)
from capstone.local.corpus import chunk_text, reference_documents


def _check(
    records: list[object], max_chunk_chars: int = 100
) -> tuple[list[EnrichedDocument], list[RejectedDocument]]:
    results = list(
        validate_documents(
            ((f"r{i}", r) for i, r in enumerate(records)), max_chunk_chars=max_chunk_chars, max_chunks=5
        )
    )
    return (
        [r for r in results if isinstance(r, EnrichedDocument)],
        [r for r in results if isinstance(r, RejectedDocument)],
    )


GOOD = {"id": "a", "content": "text", "chunks": ["one", "two"], "metadata": {"k": 1}}


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"content": "x", "chunks": ["x"]}, "missing or invalid 'id'"),
        ({**GOOD, "id": ""}, "missing or invalid 'id'"),
        ({**GOOD, "content": "  "}, "'content' is missing or empty"),
        ({**GOOD, "chunks": []}, "non-empty list"),
        ({**GOOD, "chunks": "abc"}, "non-empty list"),
        ({**GOOD, "chunks": ["ok", 3]}, "chunk 1 is a int"),
        ({**GOOD, "chunks": ["ok", " "]}, "chunk 1 is empty"),
        ({**GOOD, "chunks": ["a\x00b"]}, "NUL"),
        ({**GOOD, "chunks": ["x" * 101]}, "chunk 0 has 101 characters"),
        ({**GOOD, "chunks": ["c"] * 6}, "max_chunks_per_document"),
        ({**GOOD, "metadata": ["not", "a", "dict"]}, "must be a JSON object"),
        ({**GOOD, "metadata": {"nan": float("nan")}}, "not JSON-serialisable"),
        ({**GOOD, "metadata": {"bytes": b"x"}}, "not JSON-serialisable"),
        ("just a string", "must be a JSON object"),
        ({"id": "gone", "deleted": "yes"}, "'deleted' must be true or false"),
        ({**GOOD, "deleted": 1}, "'deleted' must be true or false"),
    ],
)
def test_bad_documents_are_set_aside_with_their_reason(record: object, reason: str) -> None:
    good, rejected = _check([record, {**GOOD, "id": "fine"}])
    assert [d.id for d in good] == ["fine"]
    assert len(rejected) == 1 and reason in rejected[0].reason


def test_a_tombstone_needs_only_its_id() -> None:
    good, rejected = _check(
        [
            {"id": "gone", "deleted": True},
            {"id": "also-gone", "deleted": True, "content": "", "chunks": [], "metadata": "ignored"},
            {**GOOD, "deleted": False},
        ]
    )

    assert rejected == []
    assert good == [
        EnrichedDocument.tombstone("gone"),
        EnrichedDocument.tombstone("also-gone"),
        EnrichedDocument(id="a", content="text", chunks=["one", "two"], metadata={"k": 1}),
    ]
    assert good[0].deleted and good[0].chunks == [] and not good[2].deleted


def test_duplicate_ids_keep_the_first_record() -> None:
    good, rejected = _check([GOOD, {**GOOD, "chunks": ["other"]}])
    assert [d.chunks for d in good] == [["one", "two"]]
    assert rejected[0].reason.startswith("duplicate document id")


def test_jsonl_reader_reports_bad_lines_without_stopping(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode()
        + b"\n{not json\n"
        + b'{"id": "\xff\xfe"}\n'
        + json.dumps({**GOOD, "id": "b"}).encode()
    )
    good, rejected = _check([r for _, r in read_batch(BatchLocation.from_extra({"path": str(path)}))])
    assert [d.id for d in good] == ["a", "b"]
    assert sorted(r.reason.split(":")[0] for r in rejected) == ["invalid JSON", "invalid UTF-8 at byte 8"]


def test_event_extra_must_say_where_the_batch_is() -> None:
    with pytest.raises(ValueError, match="needs 'path'"):
        BatchLocation.from_extra({"format": "jsonl"})
    with pytest.raises(ValueError, match="unknown batch format"):
        BatchLocation.from_extra({"format": "csv"})
    with pytest.raises(ValueError, match="plain identifiers"):
        BatchLocation.from_extra({"format": "postgres", "table": "x; drop table y", "batch_id": "1"})
    assert BatchLocation.from_extra({"format": "postgres", "table": "s.t", "batch_id": 7}).batch_id == "7"


def test_reference_corpus_chunks_cover_every_topic_within_the_size() -> None:
    documents = reference_documents(target_chars=800)
    assert len(documents) == 79
    assert all(0 < len(chunk) <= 800 for doc in documents for chunk in doc["chunks"])
    assert "".join(chunk_text("a\n\nb", 10)).replace("\n", "") == "ab"


def test_chunk_limit_is_lowered_to_the_models_hard_input_limit() -> None:
    from capstone.pipeline import _chunk_limit
    from tests.support.settings import collection_settings

    openai = {"provider": "openai", "model": "text-embedding-3-small", "dimension": 1536}
    assert _chunk_limit(collection_settings("c", "s", embedding=openai)) == 8000  # the spec's is lower
    long_chunks = {"max_chunk_chars": 100_000}
    assert _chunk_limit(collection_settings("c", "s", embedding=openai, chunking=long_chunks)) == 8191 * 3
    assert _chunk_limit(collection_settings("c", "s", chunking=long_chunks)) == 100_000

"""Documents that arrive whole are chunked by the collection's spec on their way into the table; a
second run of the same content embeds nothing, and a new ``chunking`` re-embeds only the chunks
whose text changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capstone.chunking import Chunker
from capstone.pipeline import run_key_for
from tests.support.pipeline import run_pipeline, run_until_upsert
from tests.support.settings import collection_settings
from tests.support.tables import assert_table_holds_exactly, jsonl_batch

SECTIONS = [f"Section {i}. " + " ".join(f"word{i}_{j}" for j in range(30)) for i in range(6)]


def _whole(doc_id: str, sections: list[str]) -> dict[str, Any]:
    return {"id": doc_id, "content": "\n\n".join(sections), "metadata": {"title": doc_id}}


def test_whole_documents_are_chunked_then_unchanged_content_embeds_nothing(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    settings = collection_settings(
        "whole", pg_schema, embedding={"dimension": 32}, chunking={"size": 300, "unit": "characters"}
    )
    documents = [_whole("a", SECTIONS), _whole("b", SECTIONS[:2])]
    batch = jsonl_batch(tmp_path / "whole.jsonl", documents)

    result = run_pipeline(settings, run_key_for("whole", "1"), [batch])

    chunker = Chunker(settings.chunking, settings.embedding)
    expected = [{**doc, "chunks": chunker.split(doc["content"])} for doc in documents]
    assert [len(doc["chunks"]) for doc in expected] == [6, 2]  # one per section: each fits, two don't
    assert result["upserted"] == 8
    assert_table_holds_exactly(pg_dsn, pg_schema, "whole", expected, model="hash-v1", dimension=32)
    again = run_until_upsert(settings, run_key_for("whole", "2"), [batch])
    assert again is not None  # the index was never built here, so the run goes on to build it
    assert (again["embedded"], again["to_delete"]) == (0, 0)


def test_a_new_chunking_re_embeds_only_the_chunks_whose_text_changed(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    before = collection_settings(
        "rechunk", pg_schema, embedding={"dimension": 32}, chunking={"size": 300, "unit": "characters"}
    )
    # A final paragraph of short sentences: only it is cut differently by the larger size below.
    sentences = " ".join(f"Sentence {k} is about vector search and index builds." for k in range(10))
    sections = [*SECTIONS[:3], sentences]
    batch = jsonl_batch(tmp_path / "doc.jsonl", [_whole("a", sections)])
    run_pipeline(before, run_key_for("rechunk", "1"), [batch])
    after = collection_settings(
        "rechunk", pg_schema, embedding={"dimension": 32}, chunking={"size": 400, "unit": "characters"}
    )
    old_chunks = Chunker(before.chunking, before.embedding).split(_whole("a", sections)["content"])
    new_chunks = Chunker(after.chunking, after.embedding).split(_whole("a", sections)["content"])
    same = sum(old == new for old, new in zip(old_chunks, new_chunks, strict=False))
    assert 0 < same < len(new_chunks)

    totals = run_until_upsert(after, run_key_for("rechunk", "2"), [batch])

    assert totals is not None
    assert totals["embedded"] == len(new_chunks) - same
    assert totals["to_delete"] == max(0, len(old_chunks) - len(new_chunks))

"""The demo corpus: the Python language reference that ships with every Python (``pydoc_data``).

Stands in for an upstream LLM enrichment pipeline: each of the 79 topics becomes an enriched
document with a title, paragraph-packed chunks and metadata, written as a JSONL batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["chunk_text", "reference_documents", "write_jsonl_batch"]

CORPUS = "python-language-reference"


def chunk_text(text: str, target_chars: int = 800) -> list[str]:
    """Pack paragraphs into chunks of about ``target_chars``; a longer paragraph is split on lines."""
    chunks: list[str] = []
    current = ""
    for paragraph in _pieces(text, target_chars):
        if current and len(current) + len(paragraph) + 2 > target_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        chunks.append(current)
    return chunks


def _pieces(text: str, limit: int) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if len(paragraph) <= limit:
            yield paragraph
            continue
        line_block = ""
        for line in paragraph.splitlines():
            while len(line) > limit:  # a single huge line: cut it hard
                yield line[:limit]
                line = line[limit:]
            if line_block and len(line_block) + len(line) + 1 > limit:
                yield line_block
                line_block = ""
            line_block = f"{line_block}\n{line}" if line_block else line
        if line_block.strip():
            yield line_block


def reference_documents(target_chars: int = 800) -> list[dict[str, Any]]:
    """The language reference as enriched documents: ``id``, ``content``, ``chunks``, ``metadata``."""
    from pydoc_data.topics import topics

    documents = []
    for topic in sorted(topics):
        text = topics[topic].strip()
        title = text.splitlines()[0].strip() if text else topic
        chunks = chunk_text(text, target_chars)
        documents.append(
            {
                "id": topic,
                "content": text,
                "chunks": chunks,
                "metadata": {"title": title, "topic": topic, "corpus": CORPUS, "chars": len(text)},
            }
        )
    return documents


def write_jsonl_batch(documents: list[dict[str, Any]], path: Path) -> Path:
    """Write ``documents`` as one JSON object per line, atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path


def write_jsonl_object(documents: list[dict[str, Any]], uri: str, conn_id: str | None) -> str:
    """Write ``documents`` as JSONL to object storage (``s3://...``) through ``ObjectStoragePath``.

    The object appears whole when the upload completes (S3 multipart semantics): readers never see
    half a batch. Returns ``uri``.
    """
    from airflow.sdk import ObjectStoragePath

    with ObjectStoragePath(uri, conn_id=conn_id).open("wb") as handle:
        for document in documents:
            handle.write((json.dumps(document, ensure_ascii=False) + "\n").encode())
    return uri

"""Chunking documents that arrive without chunks: sizes in the model's tokens or characters,
structure before words, overlap, and what the spec accepts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from capstone.chunking import Chunker, ChunkingUnavailable
from capstone.documents import EnrichedDocument, RejectedDocument, validate_documents
from capstone.local.corpus import reference_documents
from dag_factory.errors import InvalidCollectionConfig
from dag_factory.loader import load_collection
from dag_factory.runtime import settings_from_mapping

PARAGRAPHS = [
    "Airflow schedules the collection's DAG when its source asset changes.",
    "Each chunk is embedded once; a chunk whose text did not change is never embedded again.",
    "Postgres keeps the vectors, and pgvector's HNSW index answers nearest-neighbour queries.",
]


def _chunker(**chunking: Any) -> Chunker:
    embedding = chunking.pop("embedding", {"provider": "sentence-transformers"})
    settings = settings_from_mapping({"collection": "c", "chunking": chunking, "embedding": embedding})
    return Chunker(settings.chunking, settings.embedding)


def _model_tokens(text: str) -> int:
    from tokenizers import Tokenizer

    from capstone.embeddings.model_files import BUNDLED_MODEL, model_path

    tokenizer = Tokenizer.from_file(str(Path(model_path(BUNDLED_MODEL)) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_unit_auto_counts_the_local_models_tokens_and_characters_for_hash() -> None:
    local = settings_from_mapping({"collection": "c", "embedding": {"provider": "sentence-transformers"}})
    hashed = settings_from_mapping({"collection": "c"})
    assert (local.chunking.unit, local.chunking.size) == ("tokens", 200)
    assert (hashed.chunking.unit, hashed.chunking.size) == ("characters", 1000)


def test_paragraphs_are_kept_whole_when_they_fit() -> None:
    text = "\n\n".join(PARAGRAPHS)
    chunks = _chunker(size=100, unit="characters", embedding={"provider": "hash"}).split(text)
    assert chunks == PARAGRAPHS


def test_a_long_paragraph_is_cut_at_sentences_before_words() -> None:
    sentences = [f"Sentence number {i} talks about vector indexes." for i in range(6)]
    chunks = _chunker(size=110, unit="characters", embedding={"provider": "hash"}).split(" ".join(sentences))
    assert all(len(chunk) <= 110 for chunk in chunks)
    assert all(chunk.endswith(".") for chunk in chunks), chunks
    assert " ".join(chunks) == " ".join(sentences)


def test_token_sizes_hold_in_the_models_own_tokenizer_beyond_its_truncation() -> None:
    # The model's tokenizer.json truncates (and pads) to 128 tokens: counted with truncation, every
    # chunk of a long text would look short enough, and chunks of thousands of tokens would pass.
    text = reference_documents()[0]["content"] * 3
    chunks = _chunker(size=200).split(text)
    counts = [_model_tokens(chunk) for chunk in chunks]
    assert max(counts) <= 200
    assert sum(counts) / len(counts) > 100  # filled, not cut at every line
    assert _model_tokens(text) <= sum(counts) + len(chunks)  # nothing dropped


def test_overlap_repeats_the_end_of_the_chunk_before() -> None:
    words = " ".join(f"w{i}" for i in range(300))
    chunks = _chunker(size=60, overlap=20, unit="characters", embedding={"provider": "hash"}).split(words)
    for before, after in itertools.pairwise(chunks):
        assert after.split()[0] in before.split()


def test_markdown_is_split_at_headings_first() -> None:
    text = "# Install\n\npip install it, then run make demo.\n\n# Search\n\nAsk in words or by name."
    chunks = _chunker(size=60, unit="characters", format="markdown", embedding={"provider": "hash"}).split(
        text
    )
    assert chunks == [
        "# Install\n\npip install it, then run make demo.",
        "# Search\n\nAsk in words or by name.",
    ]


def test_openai_models_count_in_tiktoken_offline_and_unknown_models_in_cl100k() -> None:
    for model in ("text-embedding-3-small", "nomic-embed-text"):
        embedding = {"provider": "openai", "model": model, "dimension": 768}
        chunks = _chunker(size=8, embedding=embedding).split(" ".join(PARAGRAPHS))
        assert len(chunks) > 3 and all(chunk for chunk in chunks)


def test_a_model_without_a_tokenizer_file_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({}))
    embedding = {"provider": "sentence-transformers", "model": str(tmp_path), "dimension": 8}
    with pytest.raises(ChunkingUnavailable, match=r"chunking\.unit: characters"):
        _chunker(embedding=embedding).split("some text")


def test_documents_without_chunks_are_chunked_and_given_chunks_win() -> None:
    chunker = _chunker(size=100, unit="characters", embedding={"provider": "hash"})
    text = "\n\n".join(PARAGRAPHS)
    records = [
        ("r0", {"id": "whole", "content": text}),
        ("r1", {"id": "given", "content": text, "chunks": ["one chunk"]}),
        ("r2", {"id": "null", "content": text, "chunks": None}),
        ("r3", {"id": "empty", "content": "   "}),
        ("r4", {"id": "number", "content": 42}),
    ]
    results = list(validate_documents(records, max_chunk_chars=1000, max_chunks=10, split=chunker.split))
    documents = {r.id: r.chunks for r in results if isinstance(r, EnrichedDocument)}
    rejected = {r.id: r.reason for r in results if isinstance(r, RejectedDocument)}
    assert documents == {"whole": PARAGRAPHS, "given": ["one chunk"], "null": PARAGRAPHS}
    assert rejected == {"empty": "'content' is missing or empty", "number": "'content' is missing or empty"}


def test_the_chunk_limits_apply_to_split_chunks() -> None:
    chunker = _chunker(size=80, unit="characters", embedding={"provider": "hash"})
    records = [("r0", {"id": "long", "content": "\n\n".join(PARAGRAPHS)})]
    (result,) = validate_documents(records, max_chunk_chars=1000, max_chunks=2, split=chunker.split)
    assert isinstance(result, RejectedDocument)
    assert "max_chunks_per_document" in result.reason


@pytest.mark.parametrize(
    ("chunking", "embedding", "message"),
    [
        ("size: 100\n  overlap: 100", "hash", "chunking.overlap: must be less than size (100)"),
        ("overlap: 200", "sentence-transformers", "chunking.overlap: must be less than size (200)"),
        ("unit: tokens", "hash", "chunking.unit: the hash provider has no tokenizer"),
        ("unit: words", "hash", "chunking.unit"),
        ("format: html", "hash", "chunking.format"),
    ],
)
def test_the_spec_refuses_chunking_it_cannot_do(
    tmp_path: Path, chunking: str, embedding: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"collection: c\nembedding:\n  provider: {embedding}\nchunking:\n  {chunking}\n")
    with pytest.raises(InvalidCollectionConfig) as caught:
        load_collection(path)
    assert message in str(caught.value)
    assert "c.yaml:" in str(caught.value)

"""Chunking: splitting a document that arrives whole (``content``, no ``chunks``) into chunks.

The collection's ``chunking`` section says how (:class:`~capstone.settings.ChunkingSettings`). The
splitting is semantic-text-splitter's (chosen over chonkie, semchunk and langchain-text-splitters
by ``benchmarks/chunking.py``; see ``benchmarks/RESULTS.md``): each chunk is the largest run of
whole semantic units that fits ``size``, trying paragraphs, then lines, sentences, words and
characters (``format: markdown`` tries headings and blocks first), and repeats up to ``overlap``
of the text before it.

Sizes count in the embedding model's tokens, so that a chunk is what the model reads whole:

* the local model: its own ``tokenizer.json`` (with its truncation removed, or every chunk would
  count as at most the truncation length);
* ``openai``: tiktoken's encoding for the model, bundled in the splitter (no download); a model
  tiktoken does not know (one an OpenAI-compatible server serves) counts in ``cl100k_base``;
* or characters (``unit: characters``; the ``hash`` provider has no tokenizer).

The splitter is built on first use, so a run whose documents all bring chunks loads nothing.
Chunks are numbered in order (``<document_id>_chunk_<i>``) and hashed by their text, so a
document whose content did not change re-embeds nothing, and changing ``chunking`` re-embeds only
the chunks whose text changed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from capstone.errors import TerminalError
from capstone.settings import ChunkingSettings, EmbeddingSettings

__all__ = ["TIKTOKEN_FALLBACK_MODEL", "Chunker", "ChunkingUnavailable"]

log = logging.getLogger(__name__)

# The model whose encoding (cl100k_base) counts tokens for an openai model tiktoken does not know.
TIKTOKEN_FALLBACK_MODEL = "text-embedding-3-small"


class ChunkingUnavailable(TerminalError):
    """The collection's chunking cannot count its unit here (no tokenizer for the model)."""


class Chunker:
    """Splits document texts as a collection's ``chunking`` and ``embedding`` settings say."""

    def __init__(self, chunking: ChunkingSettings, embedding: EmbeddingSettings) -> None:
        self._chunking = chunking
        self._embedding = embedding
        self._split: Callable[[str], list[str]] | None = None

    def split(self, text: str) -> list[str]:
        """The chunks of ``text``, in order; none are empty."""
        if self._split is None:
            self._split = self._splitter()
        return [chunk for chunk in self._split(text) if chunk.strip()]

    def describe(self) -> str:
        """How documents are split, for the task log."""
        chunking = self._chunking
        unit = f"tokens of {self._embedding.model}" if chunking.unit == "tokens" else "characters"
        return f"{chunking.size} {unit}, overlap {chunking.overlap}, {chunking.format}"

    def _splitter(self) -> Callable[[str], list[str]]:
        try:
            from semantic_text_splitter import MarkdownSplitter, TextSplitter
        except ImportError as err:  # a core dependency: only a broken install lacks it
            raise ChunkingUnavailable(
                "chunking documents needs the semantic-text-splitter package, a dependency of this "
                "package: reinstall it (pip install 'capstone-vector-indexing')"
            ) from err
        kind = MarkdownSplitter if self._chunking.format == "markdown" else TextSplitter
        size, overlap = self._chunking.size, self._chunking.overlap
        if self._chunking.unit == "characters":
            splitter = kind(size, overlap=overlap)
        elif self._embedding.provider == "openai":
            splitter = kind.from_tiktoken_model(self._tiktoken_model(kind), size, overlap=overlap)
        else:
            splitter = kind.from_huggingface_tokenizer_str(self._tokenizer_json(), size, overlap=overlap)
        log.info("splitting documents without chunks into chunks of at most %s", self.describe())
        return splitter.chunks

    def _tiktoken_model(self, kind: type) -> str:
        model = self._embedding.model
        try:
            kind.from_tiktoken_model(model, 1)  # type: ignore[attr-defined]
        except Exception:  # the splitter raises a bare Exception for an unknown model
            log.info("tiktoken does not know %r: counting its tokens in cl100k_base", model)
            return TIKTOKEN_FALLBACK_MODEL
        return model

    def _tokenizer_json(self) -> str:
        """The local model's tokenizer, as JSON with truncation and padding removed."""
        from capstone.embeddings.model_files import model_path

        path = Path(model_path(self._embedding.model)) / "tokenizer.json"
        try:
            tokenizer = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ChunkingUnavailable(
                f"chunking.unit is tokens, but the model {self._embedding.model!r} has no readable "
                f"tokenizer.json ({path}: {err}): set `chunking.unit: characters`, or use a model "
                "directory that has one"
            ) from None
        tokenizer["truncation"] = None
        tokenizer["padding"] = None
        return json.dumps(tokenizer)

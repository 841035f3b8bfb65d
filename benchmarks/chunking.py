"""Splitter libraries compared: how fast they chunk, and how well the chunks are found.

The demo corpus (the Python language reference, one document per pydoc topic) is re-chunked from
its ``content`` by each candidate at the same size in the local model's tokens (all-MiniLM-L6-v2's
own tokenizer), without overlap:

* ``semantic-text-splitter`` (Rust; ``TextSplitter.from_huggingface_tokenizer``),
* ``chonkie`` (``RecursiveChunker`` with the tokenizer),
* ``semchunk`` (``chunkerify`` with the tokenizer),
* ``langchain-text-splitters`` (``RecursiveCharacterTextSplitter`` counting tokens),

and, as the baseline, the demo's own paragraph packer (``capstone.local.corpus.chunk_text``, 800
characters, what the upstream of ``make demo`` sends). Each candidate's chunks are embedded with the
local model and searched exactly (cosine over every chunk, so the index plays no part) with the
held-out queries of ``search_queries.yaml``: hit@5 and MRR@10 over distinct documents, as
``search_quality.py`` counts them. Speed is the seconds to chunk the whole corpus (best of
``--rounds``), as a ratio to the baseline's in the same run.

    .venv/bin/python benchmarks/chunking.py [--tokens 200] [--overlap 0] [--rounds 3] [--documents N]
        [--queries N] [--smoke]

The candidates run in a virtualenv of their own (``.data/bench-splitters-venv``, created on first
use), so that only the one the project picked is ever installed next to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
SPLITTERS_VENV = PROJECT_ROOT / ".data" / "bench-splitters-venv"
# The candidates, pinned: a comparison is of these versions.
CANDIDATES = {
    "semantic-text-splitter": "semantic-text-splitter==0.33.1",
    "chonkie": "chonkie==1.7.0",
    "semchunk": "semchunk==4.1.1",
    "langchain-text-splitters": "langchain-text-splitters==1.1.3",
}
BASELINE = "paragraph packer (demo, 800 chars)"
# The splitter capstone.chunking uses: the others are compared with it, query by query.
REFERENCE = "semantic-text-splitter"


# -- in the splitters' virtualenv -----------------------------------------------------------------


def _splitters(tokenizer_file: str, tokens: int, overlap: int) -> dict[str, Callable[[str], list[str]]]:
    """Each candidate as ``text -> chunks``, all sized in the model's tokens."""
    import semchunk
    from chonkie import RecursiveChunker
    from langchain_text_splitters import RecursiveCharacterTextSplitter
    from semantic_text_splitter import TextSplitter
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    sts = TextSplitter.from_huggingface_tokenizer(tokenizer, tokens, overlap=overlap)
    chonkie = RecursiveChunker(tokenizer=tokenizer, chunk_size=tokens)
    semchunker = semchunk.chunkerify(count, tokens)
    langchain = RecursiveCharacterTextSplitter(
        chunk_size=tokens, chunk_overlap=overlap, length_function=count
    )
    return {
        "semantic-text-splitter": sts.chunks,
        "chonkie": lambda text: [chunk.text for chunk in chonkie.chunk(text)],
        "semchunk": lambda text: semchunker(text, overlap=overlap or None),
        "langchain-text-splitters": langchain.split_text,
    }


def split_worker(input_file: str, tokenizer_file: str, tokens: int, overlap: int, rounds: int) -> None:
    """Chunk every document with every candidate; print ``{name: {seconds, chunks}}`` as JSON."""
    sys.path.insert(0, str(PROJECT_ROOT))
    from capstone.local.corpus import chunk_text

    documents = json.loads(Path(input_file).read_text())
    splitters = {BASELINE: chunk_text, **_splitters(tokenizer_file, tokens, overlap)}
    results: dict[str, Any] = {}
    for name, split in splitters.items():
        seconds = []
        for _ in range(rounds):
            started = time.perf_counter()
            chunks = {doc["id"]: [c for c in split(doc["content"]) if c.strip()] for doc in documents}
            seconds.append(time.perf_counter() - started)
        results[name] = {"seconds": min(seconds), "chunks": chunks}
    print(json.dumps(results))


# -- in the project's virtualenv ------------------------------------------------------------------


def splitters_python() -> Path:
    """The splitters' virtualenv's python, creating the virtualenv on first use."""
    python = SPLITTERS_VENV / "bin" / "python"
    marker = SPLITTERS_VENV / ".installed"
    if not marker.exists():
        print(f"creating {SPLITTERS_VENV} with {', '.join(CANDIDATES.values())} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(SPLITTERS_VENV)], check=True)
        requirements = [*CANDIDATES.values(), "tokenizers==0.23.3"]
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *requirements], check=True, stdout=sys.stderr
        )
        marker.touch()
    return python


def chunk_with_every_splitter(
    documents: list[dict[str, Any]], tokens: int, overlap: int, rounds: int
) -> dict[str, Any]:
    """Run :func:`split_worker` in the splitters' virtualenv; returns its results."""
    from capstone.embeddings.model_files import BUNDLED_MODEL, model_path, read_layout

    tokenizer_file = read_layout(model_path(BUNDLED_MODEL)).directory / "tokenizer.json"
    with tempfile.TemporaryDirectory() as folder:
        input_file = Path(folder) / "documents.json"
        input_file.write_text(json.dumps([{"id": d["id"], "content": d["content"]} for d in documents]))
        command = [str(splitters_python()), __file__, "--split-worker", str(input_file), str(tokenizer_file)]
        command += ["--tokens", str(tokens), "--overlap", str(overlap), "--rounds", str(rounds)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"the splitters' worker failed:\n{completed.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def query_ranks(
    embedder: Any, chunks: dict[str, list[str]], queries: list[dict[str, Any]]
) -> list[int | None]:
    """Per query, the rank (1-10) of its first expected document under exact cosine search over
    ``chunks`` (document id -> texts), counting distinct documents; None beyond 10."""
    import numpy as np

    owners = [doc_id for doc_id, texts in chunks.items() for _ in texts]
    vectors = embedder.embed([text for texts in chunks.values() for text in texts])
    query_vectors = embedder.embed([item["query"] for item in queries])
    ranks: list[int | None] = []
    for item, query in zip(queries, query_vectors, strict=True):
        ranked: list[str] = []
        for row in np.argsort(-(vectors @ query)):
            if owners[row] not in ranked:
                ranked.append(owners[row])
            if len(ranked) == 10:
                break
        ranks.append(next((i + 1 for i, doc in enumerate(ranked) if doc in item["expected"]), None))
    return ranks


def hit_at_5_and_mrr(ranks: list[int | None]) -> tuple[float, float]:
    hits = sum(rank is not None and rank <= 5 for rank in ranks)
    return hits / len(ranks), sum(1 / rank for rank in ranks if rank) / len(ranks)


def paired_mrr_difference(ranks: list[int | None], reference: list[int | None], rounds: int = 10_000) -> str:
    """MRR@10 of ``ranks`` minus the reference's over the same queries, with a 95% paired bootstrap
    interval: an interval that holds 0 is no measured difference."""
    import numpy as np

    difference = np.array(
        [(1 / a if a else 0.0) - (1 / b if b else 0.0) for a, b in zip(ranks, reference, strict=True)]
    )
    rng = np.random.default_rng(7)
    means = difference[rng.integers(0, len(difference), (rounds, len(difference)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return f"{difference.mean():+.3f} [{low:+.3f}, {high:+.3f}]"


def token_stats(chunks: dict[str, list[str]], limit: int) -> tuple[int, float, int, int]:
    """(chunks, mean tokens, max tokens, chunks over ``limit`` tokens) in the model's tokenizer."""
    from tokenizers import Tokenizer

    from capstone.embeddings.model_files import BUNDLED_MODEL, model_path, read_layout

    tokenizer = Tokenizer.from_file(str(read_layout(model_path(BUNDLED_MODEL)).directory / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()  # its tokenizer.json pads to 128: every short chunk would count 128
    counts = [
        len(tokenizer.encode(text, add_special_tokens=False).ids)
        for texts in chunks.values()
        for text in texts
    ]
    return len(counts), sum(counts) / len(counts), max(counts), sum(count > limit for count in counts)


def main(argv: list[str] | None = None) -> None:
    from common import machine_summary, parse_with_smoke
    from search_quality import load_queries, reference_subset

    from capstone.embeddings.factory import create_embedder
    from dag_factory.runtime import settings_from_mapping

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=200, help="chunk size in the model's tokens")
    parser.add_argument("--overlap", type=int, default=0, help="overlap in tokens (where a splitter has one)")
    parser.add_argument("--rounds", type=int, default=3, help="chunk the corpus this many times; best counts")
    parser.add_argument("--documents", type=int, default=None, help="index N topics only (not comparable)")
    parser.add_argument("--queries", type=int, default=None, help="the first N queries only (not comparable)")
    parser.add_argument(
        "--reference", default=REFERENCE, help="the splitter the others' MRR is compared with"
    )
    args = parse_with_smoke(parser, {"documents": 12, "rounds": 1, "queries": 4}, argv)
    print(machine_summary(), flush=True)
    queries = load_queries()[: args.queries]
    documents = reference_subset(queries, args.documents)
    known = {doc["id"] for doc in documents}
    queries = [item for item in queries if set(item["expected"]) & known]
    results = chunk_with_every_splitter(documents, args.tokens, args.overlap, args.rounds)
    settings = settings_from_mapping(
        {"collection": "chunking", "embedding": {"provider": "sentence-transformers"}}
    )
    embedder = create_embedder(settings.embedding)
    baseline_seconds = results[BASELINE]["seconds"]
    print(f"{len(documents)} documents, {len(queries)} queries, {args.tokens} tokens, overlap {args.overlap}")
    print(
        f"{'splitter':36} {'seconds':>7} {'ratio':>6} {'chunks':>6} {'mean':>4} {'max':>4} {'>256':>4} "
        f"{'hit@5':>5} {'MRR@10':>6}  MRR@10 - {args.reference}'s [95% CI]"
    )
    ranks = {name: query_ranks(embedder, result["chunks"], queries) for name, result in results.items()}
    for name, result in results.items():
        count, mean, longest, over = token_stats(result["chunks"], 256)
        hit5, mrr = hit_at_5_and_mrr(ranks[name])
        print(
            f"{name:36} {result['seconds']:7.3f} {result['seconds'] / baseline_seconds:6.1f} {count:6d} "
            f"{mean:4.0f} {longest:4d} {over:4d} {hit5:5.3f} {mrr:6.3f}  "
            f"{paired_mrr_difference(ranks[name], ranks[args.reference])}",
            flush=True,
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--split-worker":
        worker = argparse.ArgumentParser()
        worker.add_argument("input_file")
        worker.add_argument("tokenizer_file")
        worker.add_argument("--tokens", type=int)
        worker.add_argument("--overlap", type=int)
        worker.add_argument("--rounds", type=int)
        options = worker.parse_args(sys.argv[2:])
        split_worker(
            options.input_file, options.tokenizer_file, options.tokens, options.overlap, options.rounds
        )
    else:
        main()

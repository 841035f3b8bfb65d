"""Search quality on held-out queries: hit@5 and MRR@10 per search mode, on the demo collection.

The collection is the Python language reference (one document per pydoc topic), embedded with
the local model (all-MiniLM-L6-v2) and indexed with HNSW, as ``make demo`` does it, in a schema of
the benchmarks' database. The queries are ``search_queries.yaml``: written before any mode was
tuned, half asked in words, half naming an identifier. A query's hit is any of its expected
documents; ranks count distinct documents (the best chunk of each).

    .venv/bin/python benchmarks/search_quality.py [--queries N] [--documents N] [--keep] [--smoke]

Every mode is measured (``vector``, ``keyword``, ``hybrid``), keyword and hybrid with the
``english`` text search configuration (the default) and again with ``simple`` (the table's
``content_tsv`` re-generated, as a change of ``search.text_config`` does). The last line is the
best mode's MRR@10. Needs the [local] extra. ``--queries`` and ``--documents`` make a smaller run
(the first N queries; N topics, those the queries expect first): its numbers are not comparable.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import yaml
from common import bench_dsn, drop_schema, machine_summary, parse_with_smoke
from psycopg import sql

from capstone import registry, versions
from capstone.contracts import VersionRef
from capstone.documents import BatchLocation
from capstone.index_build import IndexParams, KeywordIndexParams
from capstone.local.corpus import reference_documents, write_jsonl_batch
from capstone.pipeline import aggregate_manifests, embed_batch, load_documents, prepare_chunks, upsert_vectors
from capstone.registry import CollectionRecord
from capstone.search import Searcher, distinct_documents
from capstone.settings import SEARCH_MODES, CollectionSettings, SearchMode
from capstone.store import ensure_collection_table
from dag_factory.runtime import settings_from_mapping

HERE = Path(__file__).resolve().parent
SCHEMA = "bench_search_quality"
COLLECTION = "search_quality"


def load_queries(path: Path = HERE / "search_queries.yaml") -> list[dict[str, Any]]:
    """The held-out queries: ``[{"query", "expected": [document ids]}]``."""
    return list(yaml.safe_load(path.read_text())["queries"])


def _settings(text_config: str) -> CollectionSettings:
    return settings_from_mapping(
        {
            "collection": COLLECTION,
            "embedding": {"provider": "sentence-transformers", "batch_size": 128},
            "store": {"schema": SCHEMA, "table": COLLECTION},
            "search": {"text_config": text_config},
        }
    )


def reconfigure(dsn: str, text_config: str, version: VersionRef) -> None:
    """Re-generate the keyword column of the version's table in ``text_config`` as the next run
    after a change of ``search.text_config`` does (the ANN index is dropped before that rewrite),
    build the indexes that are missing then, as that run's indexing step does, and register the
    collection anew."""
    settings = _settings(text_config)
    at_version = versions.version_settings(settings, version)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_collection_table(conn, at_version.store_table)
        conn.execute(IndexParams.of(at_version).create_sql())
        conn.execute(KeywordIndexParams.of(at_version).create_sql())
        registry.register(conn, CollectionRecord.from_settings(settings, version))


def reference_subset(queries: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The language reference's topics to index: all of them, or ``limit`` of them, those that
    ``queries`` expect first (at least those), then the others in order."""
    documents = reference_documents()
    if limit is None:
        return documents
    expected = {document for item in queries for document in item["expected"]}
    chosen = [document for document in documents if document["id"] in expected]
    others = [document for document in documents if document["id"] not in expected]
    return chosen + others[: max(0, limit - len(chosen))]


def index_reference(dsn: str, documents: list[dict[str, Any]]) -> VersionRef:
    """The topics, embedded with the local model through the pipeline's functions (into version 1
    of the collection, behind its view), indexed (ANN and keyword) and registered as validation
    registers a collection; returns the version."""
    os.environ["AIRFLOW_CONN_VECTOR_STORE_DEFAULT"] = dsn
    settings = _settings("english")
    drop_schema(dsn, SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    with tempfile.TemporaryDirectory() as folder:
        batch = write_jsonl_batch(documents, Path(folder) / "reference.jsonl")
        run_key = "search-quality"
        load_documents(settings, run_key, [BatchLocation.from_extra({"format": "jsonl", "path": str(batch)})])
        prepared = prepare_chunks(settings, run_key, max_batches=1024)
        manifests = [embed_batch(settings, run_key, share) for share in prepared["batches"]]
        upserted = upsert_vectors(settings, aggregate_manifests(prepared["summary"], manifests))
    version = upserted["version"]
    at_version = versions.version_settings(settings, version)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(IndexParams.of(at_version).create_sql())
        conn.execute(KeywordIndexParams.of(at_version).create_sql())
        registry.register(conn, CollectionRecord.from_settings(settings, version))
    return version


def quality(
    searcher: Searcher, queries: list[dict[str, Any]], mode: SearchMode
) -> tuple[float, float, list[str]]:
    """(hit@5, MRR@10, the queries missed at 5) of ``searcher`` in ``mode`` over ``queries``."""
    hits_at_5, reciprocal, missed = 0, 0.0, []
    for item in queries:
        documents = distinct_documents(searcher.search(item["query"], k=50, mode=mode), limit=10)
        rank = next((hit.rank for hit in documents if hit.document_id in item["expected"]), None)
        hits_at_5 += rank is not None and rank <= 5
        reciprocal += 1 / rank if rank else 0.0
        if rank is None or rank > 5:
            missed.append(f"{item['query']!r} (expected {item['expected']}, rank {rank})")
    return hits_at_5 / len(queries), reciprocal / len(queries), missed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="keep the indexed collection afterwards")
    parser.add_argument("--queries", type=int, default=None, help="only the first N held-out queries")
    parser.add_argument(
        "--documents",
        type=int,
        default=None,
        help="index N topics (those the queries expect first) instead of all 79",
    )
    args = parse_with_smoke(parser, {"queries": 4, "documents": 8}, argv)
    print(machine_summary(), flush=True)
    dsn = bench_dsn()
    queries = load_queries()[: args.queries]
    documents = reference_subset(queries, args.documents)
    print(f"{len(documents)} topics, {sum(len(d['chunks']) for d in documents)} chunks", flush=True)
    version = index_reference(dsn, documents)
    results: dict[str, tuple[float, float, list[str]]] = {}
    try:
        for text_config in ("english", "simple"):
            if text_config != "english":
                reconfigure(dsn, text_config, version)
            with Searcher(COLLECTION, dsn=dsn) as searcher:
                for mode in SEARCH_MODES:
                    if mode == "vector" and text_config != "english":
                        continue  # the text search configuration does not touch vector search
                    label = mode if mode == "vector" else f"{mode} ({text_config})"
                    results[label] = quality(searcher, queries, mode)
    finally:
        if not args.keep:
            drop_schema(dsn, SCHEMA)  # the collection: view, version table, catalog and registry rows
    for label, (_, _, missed) in results.items():
        print(f"{len(queries)} held-out queries; missed at 5 by {label}:")
        for line in missed:
            print(f"  {line}")
    print(f"\n{'mode':18} {'hit@5':>6} {'MRR@10':>7}")
    for label, (hit_rate, mrr, _) in results.items():
        print(f"{label:18} {hit_rate:6.3f} {mrr:7.3f}")
    best = max(results, key=lambda label: (results[label][1], results[label][0]))
    print(f"best MRR@10: {best} {results[best][1]:.3f}")


if __name__ == "__main__":
    main()

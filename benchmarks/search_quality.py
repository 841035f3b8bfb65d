"""Search quality on held-out queries: hit@5 and MRR@10 per search mode, on the demo collection.

The collection is the Python language reference (one document per pydoc topic), embedded with
the local model (all-MiniLM-L6-v2) and indexed with HNSW, as ``make demo`` does it, in a schema of
the benchmarks' database. The queries are ``search_queries.yaml``: written before any mode was
tuned, half asked in words, half naming an identifier. A query's hit is any of its expected
documents; ranks count distinct documents (the best chunk of each).

    .venv/bin/python benchmarks/search_quality.py

Modes measured so far: ``vector`` (the only one built; ``keyword`` and ``hybrid`` come with the
keyword index). The last line is the vector mode's MRR@10. Needs the [local] extra.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import yaml
from common import bench_dsn, drop_schema, machine_summary
from psycopg import sql

from capstone import registry
from capstone.documents import BatchLocation
from capstone.index_build import IndexParams
from capstone.local.corpus import reference_documents, write_jsonl_batch
from capstone.pipeline import aggregate_manifests, embed_batch, load_documents, prepare_chunks, upsert_vectors
from capstone.registry import CollectionRecord
from capstone.search import Searcher, distinct_documents
from capstone.settings import CollectionSettings
from dag_factory.runtime import settings_from_mapping

HERE = Path(__file__).resolve().parent
SCHEMA = "bench_search_quality"
COLLECTION = "search_quality"


def load_queries(path: Path = HERE / "search_queries.yaml") -> list[dict[str, Any]]:
    """The held-out queries: ``[{"query", "expected": [document ids]}]``."""
    return list(yaml.safe_load(path.read_text())["queries"])


def index_reference(dsn: str) -> CollectionSettings:
    """The language reference, embedded with the local model, indexed and registered."""
    os.environ["AIRFLOW_CONN_VECTOR_STORE_DEFAULT"] = dsn
    settings = settings_from_mapping(
        {
            "collection": COLLECTION,
            "embedding": {"provider": "sentence-transformers", "batch_size": 128},
            "store": {"schema": SCHEMA, "table": COLLECTION},
        }
    )
    drop_schema(dsn, SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    with tempfile.TemporaryDirectory() as folder:
        batch = write_jsonl_batch(reference_documents(), Path(folder) / "reference.jsonl")
        run_key = "search-quality"
        load_documents(settings, run_key, [BatchLocation.from_extra({"format": "jsonl", "path": str(batch)})])
        prepared = prepare_chunks(settings, run_key, max_batches=1024)
        manifests = [embed_batch(settings, run_key, share) for share in prepared["batches"]]
        upsert_vectors(settings, aggregate_manifests(prepared["summary"], manifests))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(IndexParams.of(settings).create_sql())
        registry.register(conn, CollectionRecord.from_settings(settings))
    return settings


def quality(searcher: Searcher, queries: list[dict[str, Any]]) -> tuple[float, float, list[str]]:
    """(hit@5, MRR@10, the queries missed at 5) of ``searcher`` over ``queries``."""
    hits_at_5, reciprocal, missed = 0, 0.0, []
    for item in queries:
        documents = distinct_documents(searcher.search(item["query"], k=50), limit=10)
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
    args = parser.parse_args(argv)
    print(machine_summary(), flush=True)
    dsn = bench_dsn()
    queries = load_queries()
    index_reference(dsn)
    try:
        with Searcher(COLLECTION, dsn=dsn) as searcher:
            hit_rate, mrr, missed = quality(searcher, queries)
    finally:
        if not args.keep:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM capstone.collections WHERE name = %s", (COLLECTION,))
            drop_schema(dsn, SCHEMA)
    print(f"{len(queries)} held-out queries; missed at 5 by vector mode:")
    for line in missed:
        print(f"  {line}")
    print(f"\n{'mode':8} {'hit@5':>6} {'MRR@10':>7}")
    print(f"{'vector':8} {hit_rate:6.3f} {mrr:7.3f}")
    print(f"vector mode MRR@10: {mrr:.3f}")


if __name__ == "__main__":
    main()

"""Search latency per mode at 100k rows: through the API (a ``Searcher`` with its model warm and
its pool open) against the bare SQL of the same query.

The collection is the Python language reference copied to 100,000 chunks (each copy's chunks
tagged with their copy number, so that no two vectors are equal), hash-embedded (384-d: the
query's embedding costs microseconds, so what is compared is the API's own cost: pool, session
settings, statement, hits), under an HNSW index (m=16, ef_construction=64) and the GIN keyword
index. It is laid out as collections now are: version 1's table ``bench_search__v1`` behind the
view ``bench_search``, registered with that version, so that searches read the version's table. The
queries are the 48 held-out queries of ``search_queries.yaml``, in turn.

"Bare SQL" is what a hand-written client does at best: one connection whose session already has
the index settings, the statement the API sends (same text, same parameters, the query's vector
computed beforehand), one round trip per search. The API and the bare client alternate search by
search; p50 and p95 per mode, and the ratio of the p50s, are printed, vector mode's last.

    .venv/bin/python benchmarks/search.py [--rows 100000] [--searches 300] [--keep] [--smoke]

``--keep`` leaves the collection in place for the next run (it is reused when its size matches).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psycopg
from common import (
    bench_dsn,
    copy_collection_rows,
    drop_schema,
    machine_summary,
    parse_with_smoke,
    resolve_version,
)
from pgvector.psycopg import register_vector
from psycopg import sql
from search_quality import load_queries

from capstone import registry, store, versions
from capstone.embeddings import create_embedder
from capstone.index_build import IndexParams, KeywordIndexParams, build_memory
from capstone.local.corpus import reference_documents
from capstone.registry import CollectionRecord
from capstone.search import (
    Searcher,
    SearchFilter,
    SearchTarget,
    ann_statement,
    hybrid_statement,
    keyword_statement,
)
from capstone.settings import SEARCH_MODES, CollectionSettings, SearchMode
from dag_factory.runtime import settings_from_mapping

SCHEMA = "bench_search"
COLLECTION = "bench_search"
K = 10


def _settings() -> CollectionSettings:
    return settings_from_mapping(
        {
            "collection": COLLECTION,
            "embedding": {"provider": "hash"},
            "store": {"schema": SCHEMA, "table": COLLECTION},
        }
    )


def build(dsn: str, rows: int) -> CollectionRecord:
    """The collection of ``rows`` chunks, indexed and registered (reused if it is already there);
    returns its registry record (which names the version's table searches read)."""
    settings = _settings()
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = registry.registered_row(conn, SCHEMA, COLLECTION)
        if found is not None and found.version_table and _count(conn, found.store_table) == rows:
            print(f"reusing {settings.store_table.qualified} ({rows} rows)", flush=True)
            return found
    drop_schema(dsn, SCHEMA)
    started = time.perf_counter()
    chunks = [
        (doc["id"], index, text, doc["metadata"]["topic"])
        for doc in reference_documents()
        for index, text in enumerate(doc["chunks"])
    ]
    copies = -(-rows // len(chunks))
    texts, ids = [], []
    for copy_no in range(copies):
        for document_id, index, text, _ in chunks:
            texts.append(f"{text} (copy {copy_no})")
            ids.append((f"{document_id}-{copy_no}", index, copy_no, document_id))
    texts, ids = texts[:rows], ids[:rows]
    vectors = create_embedder(settings.embedding).embed(texts)
    header = np.array([vectors.shape[1], 0], dtype=">i2").tobytes()
    matrix = np.ascontiguousarray(vectors, dtype=">f4")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        version = resolve_version(conn, settings)  # version 1: its table behind the view
        at_version = versions.version_settings(settings, version.ref)
        table = at_version.store_table
        copy_collection_rows(
            conn,
            table.ident,
            (
                (
                    store.chunk_id(document_id, index),
                    document_id,
                    index,
                    text,
                    json.dumps({"topic": topic, "copy": copy_no}),
                    "h",
                    header + matrix[row].tobytes(),
                    settings.embedding.model,
                )
                for row, (text, (document_id, index, copy_no, topic)) in enumerate(
                    zip(texts, ids, strict=True)
                )
            ),
        )
        memory = build_memory(rows, vectors.shape[1], "hnsw")
        conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (memory,))
        conn.execute(KeywordIndexParams.of(at_version).create_sql().replace(" CONCURRENTLY", ""))
        conn.execute(IndexParams.of(at_version).create_sql().replace(" CONCURRENTLY", ""))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table.ident))
        record = CollectionRecord.from_settings(settings, version.ref)
        registry.register(conn, record)
    print(
        f"built {settings.store_table.qualified} ({table.qualified}): {rows} rows, both indexes, "
        f"in {time.perf_counter() - started:.0f}s",
        flush=True,
    )
    return record


def _count(conn: psycopg.Connection, table: store.CollectionTable) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()
    return int(row[0]) if row else 0


def bare_client(
    conn: psycopg.Connection, record: CollectionRecord, mode: SearchMode
) -> Callable[[str, np.ndarray], int]:
    """A search function over ``conn``, whose session gets the index settings: one statement per
    search (on the table the registry names, as the API's), the vector given."""
    register_vector(conn)
    target, options = SearchTarget.of(record), record.search
    depth = K if mode == "vector" else max(K, options.candidates)
    ef_search = max(target.ef_search, depth)
    conn.execute(
        "SELECT set_config('hnsw.ef_search', %s, false), set_config('enable_seqscan', 'off', false)",
        (str(ef_search),),
    )
    statement = {"vector": ann_statement, "keyword": keyword_statement, "hybrid": hybrid_statement}[mode](
        target, SearchFilter(), full_text=True
    )
    base: dict[str, Any] = {
        "limit": K,
        "text_config": options.text_config,
        "candidates": depth,
        "rrf_k": options.rrf_k,
    }

    def search(text: str, vector: np.ndarray) -> int:
        params = base | {"text": text, "query": vector}
        return len(conn.execute(statement, params).fetchall())

    return search


def measure(
    dsn: str, record: CollectionRecord, queries: list[str], searches: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds per search, per mode, of the API and of the bare client, alternating."""
    embedder = create_embedder(record.embedding)
    vectors = {text: embedder.embed([text])[0] for text in queries}
    times: dict[str, dict[str, list[float]]] = {}
    with Searcher(COLLECTION, dsn=dsn, pool_size=1) as searcher, contextlib.ExitStack() as stack:
        for mode in SEARCH_MODES:
            conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))
            bare = bare_client(conn, record, mode)
            api_times: list[float] = []
            bare_times: list[float] = []
            for n in range(searches + 20):  # the first 20 warm up (plans, prepared statements, caches)
                text = queries[n % len(queries)]
                for who in ("api", "bare") if n % 2 == 0 else ("bare", "api"):
                    started = time.perf_counter()
                    if who == "api":
                        found = len(searcher.search(text, k=K, mode=mode))
                    else:
                        found = bare(text, vectors[text])
                    seconds = time.perf_counter() - started
                    if n >= 20:
                        (api_times if who == "api" else bare_times).append(seconds)
                    if mode != "keyword" and found != K:
                        raise AssertionError(f"{who} {mode} search for {text!r} returned {found} hits")
            times[mode] = {"api": api_times, "bare": bare_times}
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--searches", type=int, default=300, help="timed searches per mode and client")
    parser.add_argument("--keep", action="store_true", help="keep the collection for the next run")
    args = parse_with_smoke(parser, {"rows": 2000, "searches": 20}, argv)
    print(machine_summary(), flush=True)
    dsn = bench_dsn()
    record = build(dsn, args.rows)
    queries = [item["query"] for item in load_queries()]
    try:
        times = measure(dsn, record, queries, args.searches)
    finally:
        if not args.keep:
            drop_schema(dsn, SCHEMA)  # the collection: view, version table, catalog and registry rows
    print(f"\n{args.rows} rows, k={K}, {args.searches} searches per mode and client (ms)")
    print(
        f"{'mode':8} {'api p50':>8} {'api p95':>8} {'bare p50':>9} {'bare p95':>9} "
        f"{'p50 ratio':>10} {'p95 ratio':>10}"
    )
    ratios = {}
    for mode in ("keyword", "hybrid", "vector"):
        api = np.percentile(np.array(times[mode]["api"]) * 1000, [50, 95])
        bare = np.percentile(np.array(times[mode]["bare"]) * 1000, [50, 95])
        ratios[mode] = api[0] / bare[0]
        print(
            f"{mode:8} {api[0]:8.2f} {api[1]:8.2f} {bare[0]:9.2f} {bare[1]:9.2f} "
            f"{api[0] / bare[0]:10.2f} {api[1] / bare[1]:10.2f}"
        )
    print(f"vector mode p50 ratio (API / bare SQL): {ratios['vector']:.2f}")


if __name__ == "__main__":
    main()

"""Store-stage throughput vs the physical floor: raw binary COPY into an identical table.

    python benchmarks/load.py [--rows 100000] [--dim 384] [--repeats 2] [--upsert-parallelism 2] [--smoke]

Both sides start from the same chunks and vectors in memory and end with the same rows in a
collection table of the same definition (primary key, document_id index, vector column), in the
benchmarks' own database on the embedded Postgres:

* floor: one ``COPY ... FROM STDIN (FORMAT BINARY)`` of the final rows;
* ours, split by the task that does the work, into version 1 of a collection (the table
  ``ours__v1`` behind the view ``ours``, created beforehand as ``prepare_chunks`` resolves it):
  - ``load_enriched_documents``: COPY of the chunk texts (with their hashes) into staging;
  - ``generate_embedding``: binary COPY of each batch's vectors into staging;
  - ``batch_upsert_vectors`` (the store stage): ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``
    from staging into the table in transactions of ``upsert_batch_size``, ``upsert_parallelism``
    at once (the pipeline's default unless ``--upsert-parallelism`` says otherwise), then clean-up.
    The floor's COPY keeps two processes busy too: the client encoding rows, the server storing.

Runs alternate (floor, ours, floor, ours, ...) on the embedded Postgres so that machine noise
hits both; the best time of each is kept. The last line is the key ratio: store-stage rows/s over
floor rows/s; the line before it the whole write path (all three) over the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    bench_dsn,
    copy_collection_rows,
    drop_collection,
    drop_schema,
    parse_with_smoke,
    resolve_version,
    totals_of_staged,
)

from capstone import store, versions
from capstone.documents import EnrichedDocument
from capstone.pipeline import upsert_vectors
from dag_factory.runtime import settings_from_mapping
from dag_factory.spec import CollectionSpec

SCHEMA = "bench_load"


def _documents(rows: int, per_document: int = 10) -> list[EnrichedDocument]:
    return [
        EnrichedDocument(
            id=f"doc{d:07d}",
            content="x",
            chunks=[
                f"document {d} chunk {c}: " + "lorem ipsum dolor sit amet " * 8 for c in range(per_document)
            ],
            metadata={"source": "bench", "n": d},
        )
        for d in range(rows // per_document)
    ]


def _vectors(rows: int, dim: int) -> np.ndarray:
    vectors = np.random.default_rng(7).standard_normal((rows, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _fresh_table(conn: psycopg.Connection, name: str, dim: int) -> store.CollectionTable:
    """A plain collection table (the floor's), dropped first with whatever an earlier run left."""
    table = store.CollectionTable(SCHEMA, name, dim, "english", "vector")
    drop_collection(conn, SCHEMA, name)
    store.ensure_collection_table(conn, table)
    return table


def floor_copy(
    conn: psycopg.Connection, dim: int, docs: list[EnrichedDocument], vectors: np.ndarray
) -> float:
    """Raw binary COPY of the final rows into an identical table; returns seconds."""
    table = _fresh_table(conn, "floor", dim)
    header = np.array([dim, 0], dtype=">i2").tobytes()
    matrix = np.ascontiguousarray(vectors, dtype=">f4")

    def rows() -> Iterator[tuple[object, ...]]:
        row = 0
        for doc in docs:
            metadata = json.dumps(doc.metadata)
            for index, text in enumerate(doc.chunks):
                vector = header + matrix[row].tobytes()
                yield (store.chunk_id(doc.id, index), doc.id, index, text, metadata, "h", vector, "m")
                row += 1

    started = time.perf_counter()
    copy_collection_rows(conn, table.ident, rows())
    return time.perf_counter() - started


def ours(
    conn: psycopg.Connection,
    dim: int,
    docs: list[EnrichedDocument],
    vectors: np.ndarray,
    batch: int,
    parallelism: int,
) -> tuple[float, float, float]:
    """The pipeline's writes; returns seconds of (chunk staging, vector staging, store stage)."""
    settings = settings_from_mapping(
        {
            "collection": "bench_load",
            "store": {"schema": SCHEMA, "table": "ours"},
            "embedding": {"model": "m", "dimension": dim},
            "upsert_batch_size": 5000,
            "upsert_parallelism": parallelism,
        }
    )
    drop_collection(conn, SCHEMA, settings.store.table)
    version = resolve_version(conn, settings)  # a fresh collection: version 1, live, empty
    table = versions.version_settings(settings, version.ref).store_table
    run_key = f"bench-{time.time_ns()}"
    started = time.perf_counter()
    store.stage_documents(conn, run_key, settings.collection, docs, version.hash_key)
    batches = store.assign_batches(conn, run_key, table, batch, max_batches=1024)
    staged = time.perf_counter() - started

    started = time.perf_counter()
    offset = 0
    for descriptor in batches:  # what generate_embedding does, with the vectors made already
        for ids, _texts in store.pending_batch_texts(conn, run_key, table, descriptor["batch_no"], batch):
            store.write_batch_vectors(conn, run_key, ids, vectors[offset : offset + len(ids)])
            offset += len(ids)
        store.record_batch_embedded(conn, run_key, descriptor["batch_no"])
    vectors_staged = time.perf_counter() - started
    started = time.perf_counter()
    result = upsert_vectors(settings, totals_of_staged(run_key, batches, version.ref))
    stored = time.perf_counter() - started
    assert result["expected_count"] == len(vectors), result
    return staged, vectors_staged, stored


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=512, help="embedding batch size (vectors per COPY)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--upsert-parallelism",
        type=int,
        default=CollectionSpec.model_fields["upsert_parallelism"].default,
        help="connections merging at once (default: the pipeline's default)",
    )
    args = parse_with_smoke(parser, {"rows": 2000, "repeats": 1})

    dsn = bench_dsn()
    os.environ["AIRFLOW_CONN_VECTOR_STORE_DEFAULT"] = dsn
    # The store stage resolves its connection through Airflow: import Airflow before the clock.
    from capstone.connections import postgres_dsn

    postgres_dsn()
    docs, vectors = _documents(args.rows), _vectors(args.rows, args.dim)
    floor_times, staging_times, vector_times, store_times = [], [], [], []
    drop_schema(dsn, SCHEMA)  # whatever an interrupted run left
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        store.ensure_staging(conn)
        for attempt in range(1, args.repeats + 1):
            conn.execute("CHECKPOINT")
            floor_times.append(floor_copy(conn, args.dim, docs, vectors))
            conn.execute("CHECKPOINT")
            staged, vectors_staged, stored = ours(
                conn, args.dim, docs, vectors, args.batch, args.upsert_parallelism
            )
            staging_times.append(staged)
            vector_times.append(vectors_staged)
            store_times.append(stored)
            print(
                f"round {attempt}: floor COPY {floor_times[-1]:.2f}s | ours: chunk staging {staged:.2f}s, "
                f"vector staging {vectors_staged:.2f}s, store stage {stored:.2f}s",
                flush=True,
            )
    drop_schema(dsn, SCHEMA)
    floor, staging = min(floor_times), min(staging_times)
    vectors_staged, stored = min(vector_times), min(store_times)
    whole = staging + vectors_staged + stored
    rows = args.rows
    print(
        f"rows {rows} x dim {args.dim}, best of {args.repeats}, upsert_parallelism {args.upsert_parallelism}"
    )
    print(f"floor: raw binary COPY into the table   {rows / floor:10.0f} rows/s  ({floor:.2f}s)")
    print(f"load_enriched_documents: chunk staging  {rows / staging:10.0f} rows/s  ({staging:.2f}s)")
    staged_rate = rows / vectors_staged
    print(f"generate_embedding: vector staging      {staged_rate:10.0f} rows/s  ({vectors_staged:.2f}s)")
    print(f"batch_upsert_vectors (store stage)      {rows / stored:10.0f} rows/s  ({stored:.2f}s)")
    print(f"whole write path (all three) vs raw COPY: {floor / whole:.2f}")
    print(f"store-stage rows/s ratio vs raw COPY (target >= 0.8): {floor / stored:.2f}")


if __name__ == "__main__":
    main()

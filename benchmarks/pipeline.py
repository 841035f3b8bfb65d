"""A whole collection DAG under ``dag.test()`` against the physical floor of the same work.

    .venv/bin/python benchmarks/pipeline.py [--sizes 10000 100000] [--batch-size 512] [--rounds 1] [--smoke]

For each size N, N chunks of made-up text (documents of 10 chunks, one JSONL batch) are indexed
two ways into identical tables of the benchmarks' own database on the embedded Postgres:

* **ours**: the collection DAG the factory generates (``hash`` provider, 384 dims, HNSW m=16
  ef_construction=64 cosine, ``maintenance_work_mem: auto``), run once with ``dag.test()`` in a
  fresh Python process: load -> prepare -> mapped embedding -> aggregate -> upsert -> index build in
  the (inline) trigger -> validation -> publish. Timed around ``dag.test()``;
* **floor**: one ``COPY ... FROM STDIN (FORMAT BINARY)`` of the very rows the pipeline ends with
  (same ids, texts, metadata, hashes and hash-provider vectors, computed beforehand and not
  timed), then a plain ``CREATE INDEX ... USING hnsw`` with the same parameters and the same
  ``maintenance_work_mem``.

Each run also reports the mapped task instances, the largest XCom (bytes of its JSON), and the
worker's peak RSS (``VmHWM`` of the process that ran ``dag.test()``, which runs every task in
process), and for ours where the time went, task by task. Floor and ours alternate (the order
rotates over ``--rounds``); the best time of each is kept. The last line is the key ratio at the
largest size: pipeline time / floor time (target <= 2.0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    BENCH_DATA,
    alternate,
    bench_dsn,
    collection_documents,
    copy_collection_rows,
    dag_test_collection,
    drop_collection,
    drop_schema,
    failed_tasks,
    machine_summary,
    parse_with_smoke,
    prepare_airflow,
    run_worker,
    write_collection_spec,
    write_result,
)

SCHEMA = "bench_pipeline"
COLLECTION = "bench_pipeline"
DIMENSION = 384
M, EF_CONSTRUCTION = 16, 64
WORK_DIR = BENCH_DATA / "pipeline"
CONFIGS = WORK_DIR / "configs"


def batch_file(chunks: int) -> Path:
    """The JSONL batch of ``chunks`` chunks (written once per size)."""
    return WORK_DIR / f"batch-{chunks}.jsonl"


def write_batch(chunks: int) -> list[dict[str, Any]]:
    """Write the size's batch file; returns its documents."""
    from capstone.local.corpus import write_jsonl_batch

    documents = collection_documents(chunks)
    write_jsonl_batch(documents, batch_file(chunks))
    return documents


def drop_table(dsn: str, table: str) -> None:
    """Drop ``SCHEMA.table`` so that a run starts from nothing: the floor's plain table, or ours, a
    collection (its view, version tables and catalog and registry rows)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        drop_collection(conn, SCHEMA, table)
        conn.execute("CHECKPOINT")


# -- the floor ------------------------------------------------------------------------------------


def final_rows(documents: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The rows the pipeline ends with, vectors included (computed here, outside any timing)."""
    from capstone import store
    from capstone.embeddings.hashing import HashEmbedder

    texts = [text for document in documents for text in document["chunks"]]
    vectors = HashEmbedder(model="hash-v1", dimension=DIMENSION).embed(texts)
    header = (DIMENSION).to_bytes(2, "big") + (0).to_bytes(2, "big")
    matrix = vectors.astype(">f4")
    rows: list[tuple[Any, ...]] = []
    for document in documents:
        metadata = json.dumps(document["metadata"], ensure_ascii=False, sort_keys=True)
        for index, text in enumerate(document["chunks"]):
            rows.append(
                (
                    store.chunk_id(document["id"], index),
                    document["id"],
                    index,
                    text,
                    metadata,
                    store.content_hash(text, metadata, "hash-v1"),
                    header + matrix[len(rows)].tobytes(),
                    "hash-v1",
                )
            )
    return rows


def time_floor(dsn: str, rows: list[tuple[Any, ...]]) -> tuple[float, float]:
    """Seconds of (binary COPY of ``rows``, plain HNSW ``CREATE INDEX``) into a fresh identical table."""
    import psycopg
    from psycopg import sql

    from capstone import store
    from capstone.index_build import build_memory

    table = store.CollectionTable(SCHEMA, "floor", DIMENSION, "english", "vector")
    drop_table(dsn, table.table)
    with psycopg.connect(dsn, autocommit=True) as conn:
        store.ensure_collection_table(conn, table)
        started = time.perf_counter()
        copy_collection_rows(conn, table.ident, rows)
        copied = time.perf_counter() - started
        memory = build_memory(len(rows), DIMENSION, "hnsw")
        conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (memory,))
        started = time.perf_counter()
        conn.execute(
            sql.SQL(
                "CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)"
                " WITH (m = {}, ef_construction = {})"
            ).format(table.ident, sql.Literal(M), sql.Literal(EF_CONSTRUCTION))
        )
        indexed = time.perf_counter() - started
    return copied, indexed


# -- ours: dag.test() in a worker process ---------------------------------------------------------


def time_ours(dsn: str, chunks: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run the collection DAG on the size's batch in a fresh process; returns what the worker measured."""
    table = f"ours_{chunks}"
    drop_table(dsn, table)
    write_collection_spec(CONFIGS, COLLECTION, SCHEMA, table, args.batch_size, args.upsert_batch_size)
    return run_worker(
        Path(__file__), ["--dsn", dsn, "--chunks", str(chunks)], f"pipeline-{chunks}-{time.time_ns()}"
    )


def worker(dsn: str, chunks: int, result_path: Path) -> None:
    """In a fresh process: ``dag.test()`` the collection DAG; write time, TIs, XCom sizes, peak RSS."""
    prepare_airflow(CONFIGS, dsn)
    write_result(result_path, dag_test_collection(CONFIGS / f"{COLLECTION}.yaml", batch_file(chunks)))


# -- the comparison -------------------------------------------------------------------------------


def compare(dsn: str, chunks: int, args: argparse.Namespace) -> dict[str, Any]:
    """Floor and ours for one size, alternating over ``args.rounds``; returns the best of each."""
    print(f"\n== {chunks} chunks: writing the batch and the floor's rows ...", flush=True)
    rows = final_rows(write_batch(chunks))
    floor_parts: list[tuple[float, float]] = []
    ours_runs: list[dict[str, Any]] = []

    def floor() -> float:
        floor_parts.append(time_floor(dsn, rows))
        return sum(floor_parts[-1])

    def ours() -> float:
        ours_runs.append(time_ours(dsn, chunks, args))
        if ours_runs[-1]["state"] != "success" or failed_tasks(ours_runs[-1]):
            raise SystemExit(f"the pipeline run did not succeed: {ours_runs[-1]}")
        return float(ours_runs[-1]["seconds"])

    alternate(args.rounds, {"floor (COPY + CREATE INDEX)": floor, "ours (dag.test)": ours})
    best_floor = min(floor_parts, key=sum)
    best_ours = min(ours_runs, key=lambda run: run["seconds"])
    return {"chunks": chunks, "floor_copy": best_floor[0], "floor_index": best_floor[1], **best_ours}


def report(result: dict[str, Any]) -> None:
    """Print one size's numbers."""
    floor = result["floor_copy"] + result["floor_index"]
    print(
        f"{result['chunks']:>7} chunks: ours {result['seconds']:.1f}s | floor {floor:.1f}s "
        f"(COPY {result['floor_copy']:.1f}s + CREATE INDEX {result['floor_index']:.1f}s) | "
        f"ratio {result['seconds'] / floor:.2f}"
    )
    print(
        f"           mapped task instances {result['mapped_task_instances']}, largest XCom "
        f"{result['largest_xcom_bytes']} bytes ({result['largest_xcom']}), worker peak RSS "
        f"{result['peak_rss_mb']:.0f} MB ({result['rss_before_dag_test_mb']:.0f} MB before dag.test)"
    )
    tasks = ", ".join(f"{task} {seconds:.1f}s" for task, seconds in result["task_seconds"].items())
    print(f"           task time spans: {tasks}")
    print(f"           dag.test() harness start-up (warmed up, not timed): {result['harness_seconds']:.1f}s")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="chunks per run")
    parser.add_argument("--batch-size", type=int, default=512, help="embedding.batch_size of the collection")
    parser.add_argument("--upsert-batch-size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (floor, ours) per size")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, help=argparse.SUPPRESS)
    return parse_with_smoke(parser, {"sizes": [200, 500], "batch_size": 100, "upsert_batch_size": 200})


def main() -> None:
    """Both ways for every size; the ratio at the largest size last."""
    args = parse_args()
    if args.worker:
        worker(args.dsn, args.chunks, args.result)
        return
    print(machine_summary(), flush=True)
    dsn = bench_dsn()
    os.environ["AIRFLOW_CONN_VECTOR_STORE_DEFAULT"] = dsn
    prepare_airflow(CONFIGS, dsn)  # migrate once here, not inside a timed worker
    drop_schema(dsn, SCHEMA)  # whatever an interrupted run left
    results = [compare(dsn, chunks, args) for chunks in sorted(args.sizes)]
    drop_schema(dsn, SCHEMA)
    print(f"\nbest of {args.rounds} round(s); embedding.batch_size {args.batch_size}")
    for result in results:
        report(result)
    smallest, largest = results[0], results[-1]
    if len(results) > 1:
        print(
            f"worker peak RSS {smallest['chunks']} -> {largest['chunks']} chunks: "
            f"{smallest['peak_rss_mb']:.0f} -> {largest['peak_rss_mb']:.0f} MB "
            f"(x{largest['peak_rss_mb'] / smallest['peak_rss_mb']:.2f}; target <= 1024 MB and flat)"
        )
    floor = largest["floor_copy"] + largest["floor_index"]
    print(
        f"pipeline/floor time ratio at {largest['chunks']} chunks (target <= 2.0): "
        f"{largest['seconds'] / floor:.2f}"
    )


if __name__ == "__main__":
    main()

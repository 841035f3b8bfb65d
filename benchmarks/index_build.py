"""Benchmark: the trigger-driven index build against the same ``CREATE INDEX`` run plainly.

    python benchmarks/index_build.py [--rows 50000] [--dim 384] [--m 16] [--ef-construction 64] [--rounds 2]
        [--smoke]

Loads one collection table of random unit vectors into a database of its own on the embedded
Postgres (or into ``--dsn``) and, in one run, builds the same HNSW index on it, dropping it between
builds so that every build reads the very same heap:

1. by ``VectorStoreIndexingTrigger.run()`` to its event (advisory lock, progress polling, sizing);
2. by the same ``CREATE INDEX CONCURRENTLY`` through psycopg with the same ``maintenance_work_mem``;
3. by that statement at the server default ``maintenance_work_mem`` of 64MB (once).

1 and 2 alternate ABBA-wise over ``--rounds`` rounds, so drift in machine load (other processes on a
shared box) cancels out. The last line printed is the ratio trigger/plain of the mean times (target
<= 1.1). The default size (50k x 384, 2 rounds) takes about 3 minutes on 2 idle cores.

Recorded (2 vCPU shared with other jobs, load average ~5; PostgreSQL 18.6, pgvector 0.8.6):
plain 40.1s / 38.6s, trigger 43.2s / 40.6s, trigger/plain = 1.064; at 64MB 92.6s, 2.35x the
time with the auto size (147MB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
from common import bench_dsn, drop_schema, parse_with_smoke
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone import store
from capstone.index_build import IndexParams, build_memory
from capstone.triggers import VectorStoreIndexingTrigger
from dag_factory.runtime import settings_from_mapping

SCHEMA = "bench_index_build"
CONNECTION_ID = "index_build_benchmark"
SERVER_DEFAULT_MEMORY = "64MB"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of trigger vs plain builds")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="trigger progress poll, seconds")
    parser.add_argument(
        "--dsn", help="Postgres URI; default: the benchmarks' database on the embedded server"
    )
    return parse_with_smoke(parser, {"rows": 2000, "rounds": 1, "poll_interval": 0.2})


def vector_batches(rows: int, dim: int, batch: int = 10_000) -> Iterator[np.ndarray]:
    """Random L2-normalised float32 vectors, ``batch`` rows at a time (bounded memory)."""
    rng = np.random.default_rng(0)
    for start in range(0, rows, batch):
        vectors = rng.standard_normal((min(batch, rows - start), dim)).astype(np.float32)
        yield vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def create_table(dsn: str, name: str, rows: int, dim: int) -> None:
    """The collection table as the pipeline creates it, filled by binary COPY, then VACUUM ANALYZE."""
    first = sql.Identifier(SCHEMA, name)
    drop_schema(dsn, SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        store.ensure_collection_table(conn, store.CollectionTable(SCHEMA, name, dim, "english", "vector"))
        copy = sql.SQL(
            "COPY {} (id, document_id, chunk_index, content, content_hash, embedding, embedding_model) "
            "FROM STDIN WITH (FORMAT BINARY)"
        ).format(first)
        with conn.cursor().copy(copy) as writer:
            writer.set_types(["text", "text", "int4", "text", "text", "vector", "text"])
            i = 0
            for batch in vector_batches(rows, dim):
                for vector in batch:
                    writer.write_row(
                        (f"d{i // 10}_chunk_{i % 10}", f"d{i // 10}", i % 10, "", f"h{i}", vector, "b")
                    )
                    i += 1
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(first))


def time_trigger(params: IndexParams, rows: int, poll_interval: float) -> float:
    """Seconds for the trigger's ``run()`` to yield its (success) event."""
    trigger = VectorStoreIndexingTrigger(
        collection_name=params.table,
        expected_count=rows,
        index=params,
        connection_id=CONNECTION_ID,
        poll_interval=poll_interval,
        timeout=3600,
    )

    async def run() -> dict[str, Any]:
        (event,) = [event async for event in trigger.run()]  # the trigger fires exactly one event
        return dict(event.payload)

    started = time.monotonic()
    event = asyncio.run(run())
    elapsed = time.monotonic() - started
    if event["status"] != "success":
        raise SystemExit(f"the trigger did not build the index: {event}")
    return elapsed


def time_plain(dsn: str, params: IndexParams, memory: str) -> float:
    """Seconds for the same ``CREATE INDEX`` through psycopg at ``maintenance_work_mem=memory``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (memory,))
        started = time.monotonic()
        conn.execute(params.create_sql().encode())
        return time.monotonic() - started


def drop_index(dsn: str, params: IndexParams) -> None:
    """Drop the index so the next build starts from the bare table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP INDEX {params.qualified_index()}".encode())


def timed_builds(
    dsn: str, params: IndexParams, args: argparse.Namespace, memory: str
) -> dict[str, list[float]]:
    """Trigger and plain builds in ABBA order over ``args.rounds`` rounds; seconds per build."""
    times: dict[str, list[float]] = {"plain": [], "trigger": []}
    for round_no in range(args.rounds):
        order = ("plain", "trigger") if round_no % 2 == 0 else ("trigger", "plain")
        for way in order:
            if way == "plain":
                seconds = time_plain(dsn, params, memory)
            else:
                seconds = time_trigger(params, args.rows, args.poll_interval)
            drop_index(dsn, params)
            times[way].append(seconds)
            print(f"round {round_no + 1}: {way:7} build {seconds:6.1f}s", flush=True)
    return times


def main() -> None:
    """Build the same index the three ways and print the timings; the ratio comes last."""
    args = parse_args()
    dsn = args.dsn or bench_dsn()
    os.environ[f"AIRFLOW_CONN_{CONNECTION_ID.upper()}"] = dsn
    index = {"m": args.m, "ef_construction": args.ef_construction}
    settings = settings_from_mapping(
        {"collection": "docs", "store": {"schema": SCHEMA, "table": "docs"}, "index": index}
    )
    params = IndexParams.of(settings)
    memory = build_memory(args.rows, args.dim, "hnsw")

    print(f"loading {args.rows} x {args.dim} vectors ...", flush=True)
    create_table(dsn, params.table, args.rows, args.dim)
    print(f"index: hnsw {params.with_options()}, cosine; auto maintenance_work_mem = {memory}", flush=True)
    times = timed_builds(dsn, params, args, memory)
    default_s = time_plain(dsn, params, SERVER_DEFAULT_MEMORY)
    drop_schema(dsn, SCHEMA)

    plain_s, trigger_s = statistics.mean(times["plain"]), statistics.mean(times["trigger"])
    print(f"plain CREATE INDEX via psycopg, maintenance_work_mem={memory}: mean {plain_s:.1f}s")
    print(f"trigger run() to its event, maintenance_work_mem=auto ({memory}): mean {trigger_s:.1f}s")
    print(
        f"plain CREATE INDEX at the server default maintenance_work_mem={SERVER_DEFAULT_MEMORY}: "
        f"{default_s:.1f}s, {default_s / plain_s:.2f}x the time with the auto size {memory}"
    )
    print(f"trigger/plain = {trigger_s / plain_s:.3f}")


if __name__ == "__main__":
    main()

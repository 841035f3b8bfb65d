"""How long switching a collection to another version holds up its readers.

Two versions of one collection (``capstone.versions``): version 1 with 384-d vectors, version 2
with 256-d, ``--rows`` rows each. Reader threads query the stable name (the view) in a loop, each
query a nearest-neighbour search by exact scan (tens of milliseconds: a reader that holds the
view's lock for a while), its query vector read from the view itself so that it works whichever
version is live. Two phases of ``--seconds`` each, alternating (baseline, switching, baseline,
...): without switches, and with a switch (``capstone.versions.switch``, back and forth) every
``--every`` seconds. Printed: how long each switch held the view's exclusive lock (from its
``CREATE OR REPLACE VIEW`` to its commit, which includes waiting for the queries running at that
moment), and the readers' p50, p99 and worst latency in both phases, as ratios switching/baseline.

    .venv/bin/python benchmarks/version_switch.py [--rows 20000] [--readers 2] [--seconds 10] [--smoke]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import numpy as np
import psycopg
from common import bench_dsn, drop_schema, machine_summary, parse_with_smoke
from psycopg import sql

from capstone import store, versions
from capstone.settings import CollectionSettings
from dag_factory.runtime import settings_from_mapping

SCHEMA = "bench_switch"
NAME = "bench_switch"


def _settings(dimension: int) -> CollectionSettings:
    return settings_from_mapping(
        {
            "collection": NAME,
            "embedding": {"provider": "hash", "dimension": dimension},
            "store": {"schema": SCHEMA, "table": NAME, "keep_versions": 5},
        }
    )


def _fill(conn: psycopg.Connection, table: str, rows: int, dimension: int) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, document_id, chunk_index, content, metadata, content_hash, embedding,"
            " embedding_model) SELECT 'c' || g, 'd' || g, 0, 'chunk ' || g, '{{}}', 'h',"
            " (SELECT array_agg(random()) FROM generate_series(1, %s) s WHERE g > 0)::vector, 'hash-v1'"
            " FROM generate_series(1, %s) g"
        ).format(sql.Identifier(SCHEMA, table)),
        (dimension, rows),
    )
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(SCHEMA, table)))


def _reader(dsn: str, stop: threading.Event, phase: list[str], latencies: dict[str, list[float]]) -> None:
    query = sql.SQL(
        "SELECT id FROM {view} ORDER BY embedding <=> (SELECT embedding FROM {view} LIMIT 1) LIMIT 10"
    ).format(view=sql.Identifier(SCHEMA, NAME))
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            started = time.perf_counter()
            conn.execute(query).fetchall()
            latencies[phase[0]].append((time.perf_counter() - started) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parse_with_smoke(parser, {"rows": 500, "seconds": 1.0, "every": 0.2, "rounds": 1})
    print(machine_summary())
    dsn = bench_dsn()
    drop_schema(dsn, SCHEMA)  # the collection (view, versions, catalog rows) an earlier run left
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        versions.ensure_catalog(conn)
        one = versions.resolve(conn, _settings(384))
        _fill(conn, one.table, args.rows, 384)
        two = versions.resolve(conn, _settings(256))
        _fill(conn, two.table, args.rows, 256)
        store.ensure_staging(conn)
    latencies: dict[str, list[float]] = {"baseline": [], "switching": []}
    locks: list[float] = []
    phase, stop = ["baseline"], threading.Event()
    readers = [
        threading.Thread(target=_reader, args=(dsn, stop, phase, latencies)) for _ in range(args.readers)
    ]
    for reader in readers:
        reader.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(args.rounds):
            phase[0] = "baseline"
            time.sleep(args.seconds)
            phase[0] = "switching"
            ends = time.monotonic() + args.seconds
            while time.monotonic() < ends:
                target = two if len(locks) % 2 == 0 else one
                switched = versions.switch(
                    conn, target, lambda _conn: None, keep_versions=5, expected=("building", "retired")
                )
                locks.append(switched.lock_ms)
                time.sleep(args.every)
    stop.set()
    for reader in readers:
        reader.join()
    drop_schema(dsn, SCHEMA)
    _report(args, locks, latencies)


def _report(args: Any, locks: list[float], latencies: dict[str, list[float]]) -> None:
    print(f"{args.rows} rows per version, {args.readers} readers, a switch every {args.every}s")
    print(
        f"switches: {len(locks)}; view locked p50 {np.percentile(locks, 50):.1f} ms, "
        f"p99 {np.percentile(locks, 99):.1f} ms, max {max(locks):.1f} ms"
    )
    stats = {
        phase: (np.percentile(values, 50), np.percentile(values, 99), max(values), len(values))
        for phase, values in latencies.items()
    }
    for phase, (p50, p99, worst, count) in stats.items():
        print(
            f"readers {phase:<9} {count:>6} queries  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
            f"max {worst:7.1f} ms"
        )
    base, switching = stats["baseline"], stats["switching"]
    print(
        f"switching/baseline: p50 {switching[0] / base[0]:.2f}, p99 {switching[1] / base[1]:.2f}, "
        f"max {switching[2] / base[2]:.2f}"
    )


if __name__ == "__main__":
    main()

"""Freshness: from a row's commit in an application's table to its new text in the collection.

    .venv/bin/python benchmarks/freshness.py [--probes 20] [--burst 1000] [--documents N] [--smoke]

Two collections follow two copies of a table of the demo corpus (the Python language reference,
one row per topic: ``id``, ``body``, ``title``), one embedded with ``hash`` and one with the local
model (all-MiniLM-L6-v2, ONNX Runtime), on the local stack (LocalExecutor, scheduler,
dag-processor, triggerer, api-server; the stack's low-latency settings). Nothing triggers a run:
the capture triggers queue each commit and ``TableChangesTrigger`` fires the DAG.

1. **probes**: ``--probes`` times, one row's text is changed (a sentence appended) and committed;
   timed from the commit until the new text is found through the collection's stable name (the
   view consumers read), polled every 50 ms. Printed: p50 and p95 per provider (targets: p50 <=
   15 s with hash, <= 25 s with the local model), and where the time goes, as the mean of: commit
   -> run queued (the capture, the trigger, the asset event), queued -> first task, each task up
   to the upsert (the text is searchable once it committed), between them, and the upsert's end ->
   found. The same run's own duration (queued -> end: it goes on to build, validate and publish)
   is the baseline in the same run: found / run.
2. **burst**: ``--burst`` rows inserted in transactions of 10 within 10 s (hash collection); timed
   until the collection holds exactly the table's rows; printed with the number of runs it took
   (target: at most 3).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml
from common import (
    BENCH_DATA,
    BENCH_DATABASE,
    PROJECT_ROOT,
    bench_dsn,
    drop_schema,
    machine_summary,
    parse_with_smoke,
)
from peer_sync import task_breakdown
from psycopg import sql

from capstone.chunking import Chunker
from capstone.local.corpus import reference_documents
from capstone.table_source import remove_capture
from dag_factory.loader import load_collection
from dag_factory.local.api import AirflowApi
from dag_factory.local.stack import AirflowStack
from dag_factory.runtime import collection_settings

SCHEMA = "bench_freshness"
WORK = BENCH_DATA / "freshness"
PROVIDERS = {"hash": "fresh_hash", "sentence-transformers": "fresh_local"}
POLL_SECONDS = 0.05
# The tasks before a change is searchable (the rest of the run builds, validates and publishes).
WRITE_PATH = (
    "load_enriched_documents",
    "prepare_chunks",
    "generate_embedding",
    "aggregate_embeddings",
    "batch_upsert_vectors",
)


def write_collections(configs: Path) -> None:
    """One collection per provider, each following a table of its own."""
    for provider, collection in PROVIDERS.items():
        spec: dict[str, Any] = {
            "collection": collection,
            "source": {
                "table": {"name": f"{SCHEMA}.{collection}_rows", "content": "body", "metadata": ["title"]}
            },
            "embedding": {"provider": provider, "pool": f"bench_{collection}", "pool_slots": 1},
            "store": {"schema": SCHEMA, "max_delete_fraction": 1.0},
            "dag": {"retries": 0},
        }
        (configs / f"{collection}.yaml").write_text(yaml.safe_dump(spec))


def create_tables(dsn: str, documents: list[dict[str, Any]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        for collection in PROVIDERS.values():
            table = sql.Identifier(SCHEMA, f"{collection}_rows")
            conn.execute(
                sql.SQL("CREATE TABLE {} (id text PRIMARY KEY, body text, title text)").format(table)
            )
            with conn.cursor().copy(sql.SQL("COPY {} (id, body, title) FROM STDIN").format(table)) as copy:
                for doc in documents:
                    copy.write_row((doc["id"], doc["content"], doc["metadata"].get("title", doc["id"])))


def expected_rows(dsn: str, configs: Path, collection: str) -> set[tuple[str, str]]:
    """(document id, chunk text) of every chunk the collection must hold for its table."""
    settings = collection_settings(load_collection(configs / f"{collection}.yaml"))
    chunker = Chunker(settings.chunking, settings.embedding)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id, body FROM {}").format(sql.Identifier(SCHEMA, f"{collection}_rows"))
        )
        return {(doc_id, chunk) for doc_id, body in rows for chunk in chunker.split(body)}


def stored_rows(dsn: str, collection: str) -> set[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.{collection}",)).fetchone() == (None,):
            return set()
        query = sql.SQL("SELECT document_id, content FROM {}").format(sql.Identifier(SCHEMA, collection))
        return {(row[0], row[1]) for row in conn.execute(query)}


def wait_exact(dsn: str, configs: Path, collection: str, timeout: float) -> float:
    """Seconds until the collection holds exactly its table's chunks."""
    started = time.monotonic()
    expected = expected_rows(dsn, configs, collection)
    while stored_rows(dsn, collection) != expected:
        if time.monotonic() - started > timeout:
            raise SystemExit(
                f"{collection} did not match its table within {timeout:.0f}s; see {WORK}/airflow/logs"
            )
        time.sleep(0.25)
    return time.monotonic() - started


def probe(dsn: str, collection: str, doc_id: str, number: int) -> tuple[datetime, float]:
    """Append a sentence to one row, commit; (commit time, seconds until found in the collection)."""
    token = f"freshnessprobe{number}x{os.getpid()}"
    table = sql.Identifier(SCHEMA, f"{collection}_rows")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET body = body || %s WHERE id = %s").format(table),
            (f"\n\nProbe {token}.", doc_id),
        )
        committed, started = datetime.now(UTC), time.perf_counter()
        found = sql.SQL("SELECT 1 FROM {} WHERE document_id = %s AND content LIKE %s LIMIT 1").format(
            sql.Identifier(SCHEMA, collection)
        )
        while conn.execute(found, (doc_id, f"%{token}%")).fetchone() is None:
            if time.perf_counter() - started > 300:
                raise SystemExit(f"probe {token} not found in {collection} after 300s")
            time.sleep(POLL_SECONDS)
        return committed, time.perf_counter() - started


def run_of(api: AirflowApi, dag_id: str, committed: datetime) -> dict[str, Any] | None:
    """The first run of ``dag_id`` queued after ``committed``, once it finished."""
    for _ in range(200):
        runs = [run for run in api.runs(dag_id) if datetime.fromisoformat(run["queued_at"]) >= committed]
        if runs:
            run = min(runs, key=lambda item: item["queued_at"])
            if run["state"] in ("success", "failed"):
                return dict(run)
        time.sleep(0.2)
    return None


def breakdown(api: AirflowApi, dag_id: str, committed: datetime, found: float) -> dict[str, float] | None:
    run = run_of(api, dag_id, committed)
    if run is None:
        return None
    queued, ended = datetime.fromisoformat(run["queued_at"]), datetime.fromisoformat(run["end_date"])
    tis = [ti for ti in api.task_instances(dag_id, run["dag_run_id"]) if ti.get("start_date")]
    first_start = min(datetime.fromisoformat(ti["start_date"]) for ti in tis)
    # The new text is searchable once the upsert committed: the tasks after it do not count.
    writing = [ti for ti in tis if ti["task_id"] in WRITE_PATH]
    upserted = max(datetime.fromisoformat(ti["end_date"]) for ti in writing if ti.get("end_date"))
    spans = task_breakdown(writing)
    return {
        "commit -> queued": (queued - committed).total_seconds(),
        "queued -> first task": (first_start - queued).total_seconds(),
        **spans["tasks"],
        "between tasks": spans["between_tasks"],
        "upsert end -> found": found - (upserted - committed).total_seconds(),
        "run (queued -> end)": (ended - queued).total_seconds(),
    }


def probe_collection(api: AirflowApi, dsn: str, collection: str, ids: list[str], probes: int) -> None:
    found_seconds, parts = [], []
    for number in range(probes):
        committed, found = probe(dsn, collection, ids[number % len(ids)], number)
        found_seconds.append(found)
        part = breakdown(api, collection, committed, found)
        if part is not None:
            parts.append(part)
        time.sleep(1.0)  # the run ends (publish) after the text is found: let it finish
    p50 = statistics.median(found_seconds)
    p95 = statistics.quantiles(found_seconds, n=20)[-1] if len(found_seconds) > 1 else found_seconds[0]
    mean = {key: statistics.mean(part.get(key, 0.0) for part in parts) for key in (parts[0] if parts else {})}
    run = mean.get("run (queued -> end)", 0.0)
    print(
        f"{collection}: {probes} probes, commit -> found p50 {p50:.2f}s, p95 {p95:.2f}s, "
        f"max {max(found_seconds):.2f}s"
    )
    print("  mean of: " + ", ".join(f"{key} {value:.2f}" for key, value in mean.items()))
    if run:
        print(
            f"  found / the run's own duration (baseline): {statistics.mean(found_seconds) / run:.2f}",
            flush=True,
        )


def burst(api: AirflowApi, dsn: str, configs: Path, rows: int) -> None:
    collection = PROVIDERS["hash"]
    table = sql.Identifier(SCHEMA, f"{collection}_rows")
    runs_before = {run["dag_run_id"] for run in api.runs(collection)}
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for first in range(0, rows, 10):
            with conn.transaction():
                for i in range(first, min(first + 10, rows)):
                    conn.execute(
                        sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(table),
                        (
                            f"burst-{i}",
                            f"Row {i} of the burst, about vector search and its indexes.",
                            f"burst {i}",
                        ),
                    )
            time.sleep(max(0.0, started + (first + 10) * 10.0 / rows - time.monotonic()))
    written = time.monotonic() - started
    exact = wait_exact(dsn, configs, collection, timeout=600) + written
    time.sleep(3)
    runs = [run for run in api.runs(collection) if run["dag_run_id"] not in runs_before]
    print(
        f"burst: {rows} rows inserted in {written:.1f}s; the collection exact {exact:.1f}s after the "
        "first commit, "
        f"in {len(runs)} run(s) (target <= 3)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probes", type=int, default=20, help="row updates timed per provider")
    parser.add_argument("--burst", type=int, default=1000, help="rows inserted within 10 s")
    parser.add_argument("--documents", type=int, default=None, help="the corpus's first N documents (all 79)")
    args = parse_with_smoke(parser, {"probes": 2, "burst": 40, "documents": 6}, argv)
    print(machine_summary(), flush=True)
    dsn = bench_dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for collection in PROVIDERS.values():
            remove_capture(conn, collection)
    drop_schema(dsn, SCHEMA)
    documents = reference_documents()[: args.documents]
    create_tables(dsn, documents)
    WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    configs = scratch / "configs"
    configs.mkdir()
    write_collections(configs)
    stack = AirflowStack(
        home=WORK / "airflow",
        api_port=int(os.environ.get("BENCH_API_PORT", 28089)),
        configs=configs,
        metadata_db="airflow_bench_freshness",
        vector_db=BENCH_DATABASE,
    )
    stack.drop_metadata_db()
    with stack:
        api = AirflowApi(stack.api_url, "admin", stack.password)
        for collection in PROVIDERS.values():
            api.wait_for_dag(collection, timeout=300)
        for collection in PROVIDERS.values():
            print(
                f"{collection}: first run (the whole table) exact after "
                f"{wait_exact(dsn, configs, collection, 600):.1f}s"
            )
        ids = [doc["id"] for doc in documents]
        for collection in PROVIDERS.values():
            probe_collection(api, dsn, collection, ids, args.probes)
        burst(api, dsn, configs, args.burst)
    drop_schema(dsn, SCHEMA)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))
    main()

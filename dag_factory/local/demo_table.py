"""``python -m dag_factory.local.demo_table`` (``make demo-table``): a collection that follows a table.

An application's table, ``demo_app.articles`` (id, title, body: whole texts, not chunks), seeded
with pages of the Python language reference, and the collection of ``table_demo/articles.yaml``
that follows it. Nobody triggers anything: the triggerer's ``TableChangesTrigger`` sees that the
capture is not installed and fires the first run, which installs it and indexes the table whole.
Then the demo commits changes the way the application would and shows each reach the index:

1. one row's text rewritten -> timed from the commit until a search of the collection finds it;
2. a row deleted and a row inserted in one transaction -> the run that follows, and its counts.

It runs its own Airflow (home ``.airflow-demo-table``, ``AIRFLOW_API_PORT`` default 28084) next to
``make demo``'s, on the same embedded Postgres, and stops it at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from dag_factory.local.api import AirflowApi
from dag_factory.local.demo import print_report, print_stage_table, wait_for_run
from dag_factory.local.stack import ROOT, SERVICES, AirflowStack

__all__ = ["main"]

CONFIGS = Path(__file__).resolve().parent / "table_demo"
DAG_ID = "articles"
SCHEMA = "demo_app"
TABLE = sql.Identifier(SCHEMA, "articles")
SEED_TOPICS = 24  # pages of the reference in the table at the start
# The rewrite of step 1: a sentence no page of the reference has, and the search that must find it.
REWRITE = (
    "Deferrable operators hand their waiting to the triggerer, so that no worker slot is held "
    "while an external system finishes its work."
)
REWRITE_QUERY = "which component waits so that workers are not held"


def seed_table(dsn: str) -> list[str]:
    """(Re)create the application's table with the first ``SEED_TOPICS`` pages; returns their ids.

    What an earlier demo left (its capture, the collection's tables and its rows in the registry and
    the version catalog) goes first, so that the first run of this one reads the table whole."""
    from capstone.local.corpus import reference_documents
    from capstone.table_source import remove_capture

    documents = reference_documents()[:SEED_TOPICS]
    with psycopg.connect(dsn, autocommit=True) as conn:
        remove_capture(conn, DAG_ID)
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
        for catalog in ("collections", "collection_versions"):
            if conn.execute("SELECT to_regclass(%s)", (f"capstone.{catalog}",)).fetchone() != (None,):
                query = sql.SQL("DELETE FROM {} WHERE schema_name = %s")
                conn.execute(query.format(sql.Identifier("capstone", catalog)), (SCHEMA,))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        conn.execute(sql.SQL("CREATE TABLE {} (id text PRIMARY KEY, title text, body text)").format(TABLE))
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(TABLE),
                [(doc["id"], doc["metadata"]["title"], doc["content"]) for doc in documents],
            )
    return [doc["id"] for doc in documents]


def rewrite_and_find(dsn: str, document_id: str, timeout: float) -> float:
    """Rewrite one row's text; seconds from its commit until a search of the collection finds it."""
    from capstone.search import Searcher

    with Searcher(DAG_ID, dsn=dsn) as searcher:  # the model loaded once, before the clock starts
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("UPDATE {} SET body = %s || body WHERE id = %s").format(TABLE),
                (REWRITE + "\n\n", document_id),
            )
        committed = time.monotonic()
        while time.monotonic() - committed < timeout:
            hits = searcher.search(REWRITE_QUERY, k=3)
            if any(hit.document_id == document_id and REWRITE[:40] in hit.snippet for hit in hits):
                return time.monotonic() - committed
            time.sleep(0.25)
    raise TimeoutError(f"the rewritten text of {document_id!r} was not found within {timeout:.0f}s")


def _follow(api: AirflowApi, before: set[str], timeout: float) -> dict[str, Any]:
    run = wait_for_run(api, DAG_ID, before, timeout)
    print(f"\n{DAG_ID} run {run['dag_run_id']} ({run['run_type']}): {run['state']}")
    print_stage_table(api.task_instances(DAG_ID, run["dag_run_id"]))
    print_report(api, DAG_ID, run["dag_run_id"])
    return run


def _run_ids(api: AirflowApi) -> set[str]:
    return {run["dag_run_id"] for run in api.runs(DAG_ID)}


def _wait_idle(api: AirflowApi, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(run["state"] not in ("success", "failed") for run in api.runs(DAG_ID)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{DAG_ID} runs still going after {timeout:.0f}s")
        time.sleep(1)


def demo(stack: AirflowStack, ids: list[str], timeout: float) -> int:
    """The demo's steps on a started ``stack``; returns the exit code."""
    api = AirflowApi(stack.api_url, "admin", stack.password)
    api.wait_for_dag(DAG_ID, timeout=180)
    for error in api.import_errors():
        print(f"import error in {error['filename']}:\n{error['stack_trace']}")
    print(f"\nnobody triggers {DAG_ID}: its watcher sees no capture installed and fires the first run")
    if _follow(api, set(), timeout)["state"] != "success":
        return 1
    _wait_idle(api, timeout)

    target = ids[len(ids) // 2]
    print(f"\n1. UPDATE demo_app.articles SET body = '{REWRITE[:40]}...' || body WHERE id = '{target}'")
    before = _run_ids(api)
    seconds = rewrite_and_find(stack.postgres_uri(), target, timeout)
    print(f"   found by the search {REWRITE_QUERY!r} {seconds:.1f} s after the commit")
    _wait_idle(api, timeout)
    print(f"   by {len(_run_ids(api) - before)} run(s) of {DAG_ID}")

    gone, new = ids[0], "table-demo-note"
    print(f"\n2. in one transaction: DELETE id '{gone}', INSERT id '{new}'")
    before = _run_ids(api)
    with psycopg.connect(stack.postgres_uri()) as conn:
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(TABLE), (gone,))
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(TABLE),
            (
                new,
                "A note",
                "Rows inserted into the table are indexed by the next run, and deleted rows leave it.",
            ),
        )
    return 0 if _follow(api, before, timeout)["state"] == "success" else 1


def main(argv: list[str] | None = None) -> int:
    """Run the table demo; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m dag_factory.local.demo_table", description=__doc__)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each step")
    args = parser.parse_args(argv)
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING)

    stack = AirflowStack(
        home=ROOT / ".airflow-demo-table",
        api_port=int(os.environ.get("AIRFLOW_API_PORT", 28084)),
        configs=CONFIGS,
        metadata_db="airflow_demo_table",
    )
    print("setting up: embedded Postgres, Airflow metadata DB, pools, connections ...", flush=True)
    stack.drop_metadata_db()  # a fresh start: the first run below is the watcher's, not an old one
    stack.setup()
    ids = seed_table(stack.postgres_uri())
    print(
        f"demo_app.articles: {len(ids)} rows (id, title, body); the collection: {CONFIGS / 'articles.yaml'}"
    )
    print(f"starting Airflow: {', '.join(SERVICES)}", flush=True)
    stack.start()
    try:
        return demo(stack, ids, args.timeout)
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())

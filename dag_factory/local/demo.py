"""``python -m dag_factory.local.demo``: the asset chain on a real local Airflow, end to end.

Starts the embedded Postgres and Airflow's four services (see :mod:`dag_factory.local.stack`),
triggers the upstream ``enrich_documents`` DAG through the REST API, follows the
asset-triggered ``documents`` run stage by stage, and prints the stage table, the validation
report, the ``documents.indexed`` event and two searches. Run it again and the incremental path
shows: nothing is re-embedded. ``--keep-running`` (``make up``) leaves Airflow up for the UI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import datetime
from typing import Any

from dag_factory.local.api import AirflowApi
from dag_factory.local.stack import EXECUTORS, SERVICES, AirflowStack

__all__ = ["main", "print_report", "print_stage_table", "wait_for_run"]

# (query, filter): one search in the collection's default mode (hybrid), one filtered by metadata.
SEARCHES: tuple[tuple[str, dict[str, Any] | None], ...] = (
    ("StopIteration when a generator returns", None),
    ("release a resource when a block ends", {"topic": "with"}),
)


def _seconds(ti: dict[str, Any]) -> float:
    start, end = ti.get("start_date"), ti.get("end_date")
    if not start or not end:
        return 0.0
    return (
        datetime.fromisoformat(end.replace("Z", "+00:00"))
        - datetime.fromisoformat(start.replace("Z", "+00:00"))
    ).total_seconds()


def _stages(tis: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from dag_factory.builder import TASK_IDS  # imports Airflow: only once the environment is set

    order = {task_id: position for position, task_id in enumerate(TASK_IDS)}
    stages: dict[str, dict[str, Any]] = {}
    for ti in sorted(tis, key=lambda ti: (order.get(ti["task_id"], 99), ti.get("map_index", -1))):
        stage = stages.setdefault(ti["task_id"], {"instances": 0, "states": {}, "seconds": 0.0, "span": []})
        stage["instances"] += 1
        stage["states"][str(ti["state"])] = stage["states"].get(str(ti["state"]), 0) + 1
        stage["seconds"] += _seconds(ti)
        stage["span"] += [stamp for stamp in (ti.get("start_date"), ti.get("end_date")) if stamp]
    return stages


def _wall(stage: dict[str, Any]) -> float:
    """Seconds from the stage's first start to its last end (mapped tasks overlap)."""
    if len(stage["span"]) < 2:
        return 0.0
    first, last = min(stage["span"]), max(stage["span"])
    return _seconds({"start_date": first, "end_date": last})


def _progress_line(stages: dict[str, dict[str, Any]]) -> str:
    """One line: stages finished, and what the stage in progress is doing."""
    finished, current = 0, ""
    for task_id, stage in stages.items():
        states = stage["states"]
        done = sum(n for state, n in states.items() if state in ("success", "skipped"))
        if done == stage["instances"]:
            finished += 1
        elif any(state not in ("None", "scheduled") for state in states) and not current:
            active = "/".join(state for state in states if state not in ("success", "None"))
            count = f" {done}/{stage['instances']} done" if stage["instances"] > 1 else ""
            current = f"{task_id} ({active}{count})"
    return f"{finished}/{len(stages)} stages done" + (f", now: {current}" if current else "")


def wait_for_run(api: AirflowApi, dag_id: str, after: set[str], timeout: float) -> dict[str, Any]:
    """Follow the first new run of ``dag_id``, printing each change of progress."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        runs = [run for run in api.runs(dag_id) if run["dag_run_id"] not in after]
        if runs:
            run = runs[-1]
            line = _progress_line(_stages(api.task_instances(dag_id, run["dag_run_id"])))
            if line != last:
                print(f"  {time.strftime('%H:%M:%S')}  {line}", flush=True)
                last = line
            if run["state"] in ("success", "failed"):
                return run
        time.sleep(1)
    raise TimeoutError(f"no finished {dag_id} run within {timeout:.0f}s")


def print_stage_table(tis: list[dict[str, Any]]) -> None:
    print(f"\n  {'stage':26} {'tasks':>5}  {'states':22} {'wall s':>7} {'task s':>7}")
    for task_id, stage in _stages(tis).items():
        states = ", ".join(f"{n} {state}" for state, n in stage["states"].items())
        print(
            f"  {task_id:26} {stage['instances']:>5}  {states:22} {_wall(stage):7.1f} {stage['seconds']:7.1f}"
        )


def print_report(api: AirflowApi, dag_id: str, run_id: str) -> None:
    loaded = api.xcom(dag_id, run_id, "load_enriched_documents")
    upserted = api.xcom(dag_id, run_id, "batch_upsert_vectors")
    aggregated = api.xcom(dag_id, run_id, "aggregate_embeddings")
    if loaded:
        print(
            f"\n  documents {loaded['documents']}, chunks {loaded['chunks']}, "
            f"set aside {loaded['rejected_count']}, deleted upstream {loaded.get('deleted_documents', 0)}"
        )
    if aggregated is None:
        print("  incremental run: 0 chunks re-embedded, 0 rows written (every chunk already indexed)")
    else:
        print(
            f"  chunks embedded {aggregated['embedded']}, refused by the embedding API "
            f"{aggregated['failed_count']}, rows upserted {upserted and upserted['upserted']}, "
            f"rows deleted {upserted and upserted['deleted']}"
        )
    report = api.xcom(dag_id, run_id, "validate_index_health")
    if report:
        print("\nvalidation")
        for name, check in report["checks"].items():
            print(f"  {name:30} {str(check['status']).upper():5} {check.get('detail', '')}")
    events = api.asset_events(source_dag_id=dag_id, source_run_id=run_id)
    if events:
        print(f"\n{events[0]['name']} event extra")
        for key, value in events[0]["extra"].items():
            print(f"  {key:22} {value}")
    else:
        print(f"\n  no {dag_id}.indexed event for this run (nothing new to publish)")


def _print_searches(collection: str, dsn: str) -> None:
    from capstone.search import search_collection

    for query, search_filter in SEARCHES:
        hits = search_collection(collection, query, k=3, dsn=dsn, search_filter=search_filter)
        where = f", filter {search_filter}" if search_filter else ""
        mode = hits[0].mode if hits else "no hits"
        print(f"\nsearch: {query!r} ({mode}{where})   (rank, score, document, chunk, text)")
        for hit in hits:
            snippet = " ".join(hit.snippet.split())[:60]
            print(f"  {hit.rank}. {hit.score:.4f}  {hit.document_id:12} {hit.chunk_id:20} {snippet}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m dag_factory.local.demo", description=__doc__)
    parser.add_argument("--keep-running", action="store_true", help="leave Airflow running (make up)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for the run")
    parser.add_argument(
        "--executor",
        choices=sorted(EXECUTORS),
        default=os.environ.get("EXECUTOR") or "local",
        help="local (LocalExecutor) or celery (Redis broker, two workers, batches in a local S3 server)",
    )
    args = parser.parse_args(argv)
    # This process only talks to the REST API and Postgres: keep library chatter out of the report.
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING)

    stack = AirflowStack(api_port=int(os.environ.get("AIRFLOW_API_PORT", 28080)), executor=args.executor)
    extras = ", Redis broker, S3-protocol server" if stack.distributed else ""
    print(f"setting up: embedded Postgres{extras}, Airflow metadata DB, pools, connections ...", flush=True)
    stack.setup()
    services = [*SERVICES, *(f"celery worker {name}" for name in stack.workers if stack.distributed)]
    print(f"starting Airflow ({EXECUTORS[args.executor]}): {', '.join(services)}", flush=True)
    stack.start()
    try:
        api = AirflowApi(stack.api_url, "admin", stack.password)
        api.wait_for_dag("documents", timeout=180)
        api.wait_for_dag("enrich_documents", timeout=180)
        for error in api.import_errors():
            print(f"import error in {error['filename']}:\n{error['stack_trace']}")
        before = {run["dag_run_id"] for run in api.runs("documents")}
        upstream = api.trigger("enrich_documents")
        print(f"\ntriggered enrich_documents ({upstream['dag_run_id']}); following the asset-triggered run:")
        run = wait_for_run(api, "documents", before, args.timeout)
        print(f"\ndocuments run {run['dag_run_id']} ({run['run_type']}): {run['state']}")
        print_stage_table(api.task_instances("documents", run["dag_run_id"]))
        print_report(api, "documents", run["dag_run_id"])
        if run["state"] == "success":
            _print_searches("documents", stack.postgres_uri())
        if args.keep_running:
            print(f"\nAirflow UI: {stack.api_url}  (user admin, password {stack.password})")
            print("stop it with: make down")
        return 0 if run["state"] == "success" else 1
    finally:
        if not args.keep_running:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())

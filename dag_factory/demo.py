"""``python -m dag_factory.demo``: index the Python language reference end to end with ``dag.test()``.

Runs the upstream ``enrich_documents`` DAG, then the ``documents`` collection DAG on the batch it
announced, against the embedded Postgres, and prints what happened. Running it again shows the
incremental path: nothing is re-embedded.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent


def _prepare_environment(collection: str) -> None:
    # Airflow reads its configuration at import: set it before anything imports airflow.
    data = Path(os.environ.setdefault("CAPSTONE_DATA_DIR", str(ROOT / ".data")))
    os.environ.setdefault("AIRFLOW_HOME", str(data / "airflow-demo"))
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("DAG_FACTORY_CONFIGS", str(ROOT / "configs"))
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")


def _start_postgres() -> None:
    from capstone.embedded_pg import default_server

    server = default_server().start()
    os.environ.setdefault("AIRFLOW_CONN_VECTOR_STORE_DEFAULT", server.uri())
    print(f"postgres    embedded PostgreSQL 18 + pgvector on {server.host}:{server.port} ({server.pgdata})")


def _migrate_airflow() -> None:
    Path(os.environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    print(f"airflow     metadata DB ready in {os.environ['AIRFLOW_HOME']}")


def _run(dag_id: str, conf: dict[str, Any] | None = None) -> Any:
    from dag_factory.factory import generate_dags

    dags = generate_dags()
    if dag_id == "enrich_documents":
        from airflow.dag_processing.dagbag import DagBag

        dag = DagBag(dag_folder=str(ROOT / "dags" / "enrich_documents.py")).dags[dag_id]
    else:
        dag = dags[dag_id]
    started = time.monotonic()
    print(f"running     {dag_id} ...", flush=True)
    run = dag.test(run_conf=conf)
    print(f"            {dag_id}: {run.state} in {time.monotonic() - started:.1f}s")
    return run


def _stage_table(dag_id: str, run_id: str) -> str:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state, TaskInstance.duration)
            .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
            .order_by(TaskInstance.start_date)
        ).all()
    stages: dict[str, list[Any]] = {}
    for task_id, _map_index, state, duration in rows:
        stage = stages.setdefault(task_id, [0, set(), 0.0])
        stage[0] += 1
        stage[1].add(str(state))
        stage[2] += duration or 0.0
    lines = [f"  {'task':28} {'instances':>9}  {'state':10} {'seconds':>8}"]
    for task_id, (count, states, seconds) in stages.items():
        lines.append(f"  {task_id:28} {count:>9}  {'/'.join(sorted(states)):10} {seconds:8.2f}")
    return "\n".join(lines)


def _xcom(dag_id: str, run_id: str, task_id: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_id,
                XComModel.run_id == run_id,
                XComModel.task_id == task_id,
                XComModel.key == "return_value",
                XComModel.map_index == -1,
            )
        ).first()
        return XComModel.deserialize_value(row) if row is not None else None


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m dag_factory.demo", description=__doc__)
    parser.add_argument("--collection", default="documents")
    args = parser.parse_args(argv)
    _prepare_environment(args.collection)
    _start_postgres()
    _migrate_airflow()

    upstream = _run("enrich_documents")
    extra = _xcom("enrich_documents", upstream.run_id, "write_enriched_batch")
    print(f"            documents.enriched event extra: {extra}")
    run = _run(args.collection, {"batches": [extra]})
    print("\nstages\n" + _stage_table(args.collection, run.run_id))
    prepared = _xcom(args.collection, run.run_id, "prepare_chunks")
    if prepared is None:
        print("\nnothing new: every chunk is already indexed with the same text and model (0 re-embedded)")
    report = _xcom(args.collection, run.run_id, "validate_index_health")
    if report:
        print("\nvalidation")
        for name, check in report["checks"].items():
            print(f"  {name:28} {check['status'].upper():5} {check['detail']}")
    summary = _xcom(args.collection, run.run_id, "publish_indexed_asset")
    if summary:
        print(f"\n{args.collection}.indexed event extra:")
        for key, value in summary.items():
            print(f"  {key:22} {value}")
    return 0 if str(run.state) == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
